"""A tiny run directory for the application tests (BMA, fusion): untrained source and held-out
models (fresh initialisations of their seeds) and a star trained by Starlight for one short epoch,
saved exactly as ``python -m starfast.train`` saves them."""
from starfast import models
from starfast.flat import ParamSpace
from starfast.recipes import Recipe
from starfast.rundir import ModelSpec, RunDir, heldout_seeds, source_seeds
from starfast.starlight import save_star, train_star
from starfast.train import STAR_SEED_START
from starfast.training import init_model

# One epoch of five steps on digits: a second of training.
TINY_RECIPE = Recipe(lr=0.05, weight_decay=0.0, epochs=1, batch_size=256)


def make_tiny_run(path, dataset, *, arch="mlp", kwargs=None, sources=3, heldout=2, star_sources=None) -> RunDir:
    """``sources`` sources, ``heldout`` held-out models and star 0, trained on the first
    ``star_sources`` sources (all by default)."""
    spec = ModelSpec.for_dataset(arch, dataset, kwargs if kwargs is not None else dict(width=8))
    run = RunDir(path)
    run.prepare({"model": spec.to_dict(), "dataset": dataset.name, "recipe": TINY_RECIPE.to_dict(),
                 "sources": sources, "heldout": heldout})
    for role, seeds in (("sources", source_seeds(sources)), ("heldout", heldout_seeds(heldout))):
        for seed in seeds:
            run.save_model(role, seed, init_model(spec, seed).state_dict(), {"model": spec.to_dict(), "metrics": {}})
    skeleton = spec.build()
    space = ParamSpace(skeleton)
    trained_on = source_seeds(sources)[: star_sources or sources]
    bank = space.stack([run.load_model("sources", seed)[0] for seed in trained_on])
    result = train_star(
        skeleton, bank, models.permutation_spec(skeleton), dataset, TINY_RECIPE, space=space,
        init_row=space.flatten(init_model(spec, STAR_SEED_START)), seed=STAR_SEED_START, quiet=True,
    )
    save_star(run, 0, result, {"sources": trained_on, "model": spec.to_dict(), "dataset": dataset.name})
    return run
