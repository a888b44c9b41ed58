"""A tiny run directory for the application tests (BMA, fusion): untrained source and held-out
models (fresh initialisations of their seeds) and a star trained by Starlight for one short epoch,
saved exactly as ``python -m starfast.train`` saves them."""
from starfast.models import ModelSpec
from starfast.pipeline import train_missing_stars
from starfast.recipes import Recipe
from starfast.rundir import RunDir, heldout_seeds, source_seeds
from starfast.starlight import StarlightOptions
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
    trained_on = source_seeds(sources)[: star_sources or sources]
    train_missing_stars(run, spec, dataset, TINY_RECIPE, StarlightOptions(), star_seeds=1, sources=trained_on, progress=False)
    return run
