"""Tests of starfast.data: the registry, the Dataset contract on every dataset usable here, the
CIFAR archive pipeline on generated archives in the official format, and the augmentation
against a per-image reference."""
import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import starfast.data as data
from starfast.data import CorruptDataError, RandomCropFlip
from starfast.data.dataset import IMAGENET_MEAN, IMAGENET_STD

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CIFAR10_TRAIN_PER_BATCH, CIFAR_TEST = 60, 100  # 5 x 60 train images, 100 test images


# ---------------------------------------------------------------- archives in the official format

def _pickled(entry: dict) -> bytes:
    return pickle.dumps(entry, protocol=2)


def _add_file(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write_cifar10_archive(path: Path, seed: int) -> dict:
    """A cifar-10-python.tar.gz with random images; returns the arrays it holds."""
    rng = np.random.default_rng(seed)
    train_images = rng.integers(0, 256, (5 * CIFAR10_TRAIN_PER_BATCH, 3072), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 5 * CIFAR10_TRAIN_PER_BATCH)
    test_images = rng.integers(0, 256, (CIFAR_TEST, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, CIFAR_TEST)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(5):
            part = slice(i * CIFAR10_TRAIN_PER_BATCH, (i + 1) * CIFAR10_TRAIN_PER_BATCH)
            _add_file(tar, f"cifar-10-batches-py/data_batch_{i + 1}", _pickled({
                b"batch_label": f"training batch {i + 1} of 5".encode(),
                b"labels": train_labels[part].tolist(), b"data": train_images[part],
                b"filenames": [b"x.png"] * CIFAR10_TRAIN_PER_BATCH}))
        _add_file(tar, "cifar-10-batches-py/test_batch", _pickled({
            b"batch_label": b"testing batch 1 of 1", b"labels": test_labels.tolist(),
            b"data": test_images, b"filenames": [b"x.png"] * CIFAR_TEST}))
        _add_file(tar, "cifar-10-batches-py/batches.meta", _pickled({
            b"label_names": [f"class{i}".encode() for i in range(10)],
            b"num_cases_per_batch": CIFAR10_TRAIN_PER_BATCH, b"num_vis": 3072}))
    return {"train": (train_images.reshape(-1, 3, 32, 32), train_labels),
            "test": (test_images.reshape(-1, 3, 32, 32), test_labels)}


def _write_cifar100_archive(path: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 250), ("test", CIFAR_TEST)):
            images = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
            fine = rng.integers(0, 100, count)
            _add_file(tar, f"cifar-100-python/{split}", _pickled({
                b"filenames": [b"x.png"] * count, b"batch_label": split.encode(),
                b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                b"data": images}))
            arrays[split] = (images.reshape(-1, 3, 32, 32), fine)
        _add_file(tar, "cifar-100-python/meta", _pickled({
            b"fine_label_names": [b"f"] * 100, b"coarse_label_names": [b"c"] * 20}))
    return arrays


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _normalised(images: np.ndarray) -> torch.Tensor:
    """Independent reference of the paper's CIFAR normalisation, in float64."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (torch.from_numpy(np.asarray(images)).double() / 255 - mean) / std


def _entries(directory: Path) -> list:
    """Every name in `directory`, hidden temporary files included."""
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def cifar10_archive(tmp_path_factory):
    path = tmp_path_factory.mktemp("mirror") / "cifar-10-python.tar.gz"
    arrays = _write_cifar10_archive(path, seed=1)
    return path, arrays


@pytest.fixture(scope="module")
def cifar10(cifar10_archive, tmp_path_factory):
    """The generated CIFAR-10 loaded once through the download path."""
    archive, arrays = cifar10_archive
    data_dir = tmp_path_factory.mktemp("cifar10-data")
    dataset = data.load("cifar10", data_dir, url=archive.as_uri(), md5=_md5(archive),
                        progress=False)
    return dataset, arrays, data_dir


# ------------------------------------------------------------------------------------ registry

def test_names_list_every_dataset():
    assert data.names() == ["digits", "gaussians", "mnist1d", "cifar10", "cifar100", "imagenet",
                            "synthetic"]


def test_unknown_name_error_lists_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'") as error:
        data.load("mnist")
    for name in data.names():
        assert name in str(error.value)


def test_unknown_option_error_lists_the_options():
    with pytest.raises(TypeError, match="split_seed, test_fraction"):
        data.load("digits", seed=3)


def test_imagenet_without_torchvision_says_what_to_install(tmp_path):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchvision"):
            data.load("imagenet", tmp_path)
    else:
        with pytest.raises(FileNotFoundError, match="train/ and val/"):
            data.load("imagenet", tmp_path)


def test_mnist1d_without_the_package_says_what_to_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mnist1d(name, *args, **kwargs):
        if name.split(".")[0] == "mnist1d":
            raise ImportError("No module named 'mnist1d'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mnist1d)
    with pytest.raises(ImportError, match="pip install mnist1d"):
        data.load("mnist1d")


# -------------------------------------------------------------- the Dataset contract, everywhere

def _rows(inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(input, label) pairs as sorted unique rows with counts: a multiset to compare."""
    table = torch.cat([inputs.reshape(len(inputs), -1).double().cpu(),
                       labels.double().cpu()[:, None]], dim=1).numpy()
    rows, counts = np.unique(table, axis=0, return_counts=True)
    return np.concatenate([rows, counts[:, None]], axis=1)


CONTRACT_CASES = {
    "digits": lambda _: data.load("digits"),
    "gaussians": lambda _: data.load("gaussians", num_train=301, num_test=57, seed=4),
    "synthetic": lambda _: data.load("synthetic", shape=(2, 5, 3), num_classes=7, num_train=203,
                                     num_test=31, seed=2),
    # mnist1d is an optional package (CI installs it, so these cases run there)
    "mnist1d": lambda _: (pytest.importorskip("mnist1d"),
                          data.load("mnist1d", num_samples=500))[1],
    "cifar10": lambda request: request.getfixturevalue("cifar10")[0],
}


@pytest.fixture(params=sorted(CONTRACT_CASES))
def any_dataset(request):
    return CONTRACT_CASES[request.param](request)


def test_attributes_are_consistent(any_dataset):
    ds = any_dataset
    inputs, labels = ds.tensors("train")
    test_inputs, test_labels = ds.tensors("test")
    assert isinstance(ds, data.Dataset)
    assert len(ds) == ds.num_train == len(inputs) == len(labels)
    assert ds.num_test == len(test_inputs) == len(test_labels)
    assert tuple(inputs.shape[1:]) == tuple(test_inputs.shape[1:]) == ds.input_shape
    assert ds.in_channels == ds.input_shape[0]
    for x, y in ((inputs, labels), (test_inputs, test_labels)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device == y.device == ds.device
        assert torch.isfinite(x).all()
        assert 0 <= int(y.min()) and int(y.max()) < ds.num_classes
    assert ds.binary == (ds.name == "gaussians")


def test_same_generator_seed_gives_identical_epochs(any_dataset):
    first = list(any_dataset.train_batches(64, torch.Generator().manual_seed(5)))
    again = list(any_dataset.train_batches(64, torch.Generator().manual_seed(5)))
    other = list(any_dataset.train_batches(64, torch.Generator().manual_seed(6)))
    assert len(first) == len(again) == any_dataset.num_train // 64
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not all(torch.equal(x, x2) for (x, _), (x2, _) in zip(first, other))


def test_epoch_randomness_is_drawn_when_the_epoch_starts(any_dataset):
    generator = torch.Generator().manual_seed(8)
    epoch = any_dataset.train_batches(32, generator)
    torch.rand(10, generator=generator)  # a caller drawing from the same generator meanwhile
    reference = any_dataset.train_batches(32, torch.Generator().manual_seed(8))
    for (x, y), (x2, y2) in zip(epoch, reference):
        assert torch.equal(x, x2) and torch.equal(y, y2)


def test_train_batches_shapes_and_drop_last(any_dataset):
    ds = any_dataset
    batch_size = 48
    full = list(ds.train_batches(batch_size, torch.Generator().manual_seed(0)))
    assert all(x.shape == (batch_size,) + ds.input_shape and y.shape == (batch_size,)
               for x, y in full)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 and x.device == ds.device
               for x, y in full)
    kept = list(ds.train_batches(batch_size, torch.Generator().manual_seed(0), drop_last=False))
    assert sum(len(y) for _, y in kept) == ds.num_train
    assert len(kept[-1][1]) == ds.num_train - batch_size * (len(kept) - 1)


@pytest.mark.parametrize("augment,drop_last", [(True, True), (False, False)])
def test_stacked_epochs_equal_each_generators_own_epoch(any_dataset, augment, drop_last):
    """K epochs gathered at once (one index per step) against K separate epochs stacked by the
    base class's plain zip-and-stack."""
    seeds = [3, 11, 4]
    stacked = list(any_dataset.stacked_train_batches(
        40, [torch.Generator().manual_seed(s) for s in seeds], augment=augment, drop_last=drop_last))
    reference = list(data.Dataset.stacked_train_batches(
        any_dataset, 40, [torch.Generator().manual_seed(s) for s in seeds], augment=augment, drop_last=drop_last))
    assert len(stacked) == len(reference) == (any_dataset.num_train // 40 if drop_last else -(-any_dataset.num_train // 40))
    for (x, y), (x_ref, y_ref) in zip(stacked, reference):
        assert x.shape[:2] == y.shape == (len(seeds), len(y_ref[0]))
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="at least one generator"):
        next(iter(any_dataset.stacked_train_batches(40, [])))


def test_unaugmented_epoch_is_a_permutation_of_the_train_split(any_dataset):
    ds = any_dataset
    batches = list(ds.train_batches(50, torch.Generator().manual_seed(1), augment=False,
                                    drop_last=False))
    inputs = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    np.testing.assert_array_equal(_rows(inputs, labels), _rows(*ds.tensors("train")))
    assert not torch.equal(labels, ds.tensors("train")[1])  # shuffled, not in stored order


@pytest.mark.parametrize("split", ["train", "test"])
def test_eval_batches_cover_the_split_once_in_fixed_order(any_dataset, split):
    ds = any_dataset
    batches = list(ds.eval_batches(split, batch_size=70))
    size = ds.num_train if split == "train" else ds.num_test
    assert [len(y) for _, y in batches] == [70] * (size // 70) + ([size % 70] if size % 70 else [])
    inputs, labels = ds.tensors(split)
    assert torch.equal(torch.cat([x for x, _ in batches]), inputs)
    assert torch.equal(torch.cat([y for _, y in batches]), labels)
    again = list(ds.eval_batches(split, batch_size=70))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(batches, again))


def test_bad_split_and_batch_size_are_rejected(any_dataset):
    with pytest.raises(ValueError, match="split must be one of"):
        any_dataset.eval_batches("val")
    with pytest.raises(ValueError, match="split must be one of"):
        any_dataset.tensors("validation")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        any_dataset.train_batches(0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        any_dataset.eval_batches("test", batch_size=2.5)


@pytest.mark.parametrize("device", DEVICES)
def test_data_lives_on_the_requested_device(device):
    ds = data.load("digits", device=device)
    x, y = next(ds.train_batches(16, torch.Generator().manual_seed(0)))
    assert ds.device == torch.device(device)
    assert x.device.type == y.device.type == torch.device(device).type


# ---------------------------------------------------------------------------------------- digits

def test_digits_is_sklearns_digits_standardised_and_split():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    ds = data.load("digits")
    assert ds.num_train + ds.num_test == 1797
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.num_test == pytest.approx(0.2 * 1797, abs=1)
    train, train_labels = ds.tensors("train")
    test, test_labels = ds.tensors("test")
    assert train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train.std().item() == pytest.approx(1.0, abs=1e-4)
    # Undo the (unknown, positive) affine standardisation: pixel 0 maps to the minimum value
    # and 16 to the maximum; every example must then be one of sklearn's images, exactly.
    both = torch.cat([train, test]).double()
    low, high = both.min(), both.max()
    recovered = (both - low) / (high - low) * 16
    assert torch.allclose(recovered, recovered.round(), atol=1e-4)
    expected = _rows(torch.from_numpy(bunch.images).double(), torch.from_numpy(bunch.target))
    np.testing.assert_array_equal(
        _rows(recovered.round(), torch.cat([train_labels, test_labels])), expected)


def test_digits_split_is_stratified_and_seeded():
    ds = data.load("digits")
    train_counts = torch.bincount(ds.tensors("train")[1], minlength=10)
    test_counts = torch.bincount(ds.tensors("test")[1], minlength=10)
    expected_test = (train_counts + test_counts).double() * 0.2
    assert torch.all((test_counts - expected_test).abs() <= 1)
    same = data.load("digits", split_seed=0)
    assert torch.equal(same.tensors("test")[0], ds.tensors("test")[0])
    other = data.load("digits", split_seed=1, test_fraction=0.5)
    assert other.num_test == pytest.approx(1797 / 2, abs=1)
    assert not torch.equal(other.tensors("test")[0][:100], ds.tensors("test")[0][:100])
    with pytest.raises(ValueError, match="test_fraction"):
        data.load("digits", test_fraction=1.0)


# ------------------------------------------------------------------------------------- gaussians

def test_gaussians_follow_the_documented_generative_model():
    ds = data.load("gaussians", num_train=20000, num_test=10, seed=3)
    assert ds.binary and ds.num_classes == 2 and ds.input_shape == (2,)
    x, y = ds.tensors("train")
    assert set(y.tolist()) == {0, 1} and int(y.sum()) == 10000
    for label, mean in ((0, [-3.0, -3.0]), (1, [3.0, 3.0])):
        points = x[y == label].double().numpy()
        # Sample mean within ~5 standard errors, sample covariance close to the identity.
        np.testing.assert_allclose(points.mean(axis=0), mean, atol=5 / np.sqrt(len(points)))
        np.testing.assert_allclose(np.cov(points.T), np.eye(2), atol=0.06)


def test_gaussians_options_and_seeds():
    covariance = [[2.0, 0.9], [0.9, 0.5]]
    ds = data.load("gaussians", num_train=20000, num_test=5, mean=(0.5, -2.0),
                   covariance=covariance)
    x, y = ds.tensors("train")
    ones = x[y == 1].double().numpy()
    np.testing.assert_allclose(ones.mean(axis=0), [0.5, -2.0], atol=0.08)
    np.testing.assert_allclose(np.cov(ones.T), covariance, atol=0.1)
    np.testing.assert_allclose(x[y == 0].double().numpy().mean(axis=0), [-0.5, 2.0], atol=0.08)
    a, b = data.load("gaussians", seed=7), data.load("gaussians", seed=7)
    assert torch.equal(a.tensors("test")[0], b.tensors("test")[0])
    other_seed = data.load("gaussians", seed=8)
    assert not torch.equal(a.tensors("train")[0], other_seed.tensors("train")[0])
    assert not torch.equal(a.tensors("train")[0][:100], a.tensors("test")[0][:100])
    with pytest.raises(ValueError, match="positive definite"):
        data.load("gaussians", covariance=[[1.0, 2.0], [2.0, 1.0]])


# --------------------------------------------------------------------------- mnist1d, synthetic

def test_mnist1d_shapes_seeds_and_global_rng_untouched():
    pytest.importorskip("mnist1d")  # optional package; CI installs it
    state = np.random.get_state()[1].copy()
    ds = data.load("mnist1d", num_samples=500, seed=3)
    assert np.array_equal(np.random.get_state()[1], state)
    assert ds.input_shape == (1, 40) and ds.num_classes == 10
    assert (ds.num_train, ds.num_test) == (400, 100)
    both = torch.cat([ds.tensors("train")[0], ds.tensors("test")[0]])
    assert both.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert both.std().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(data.load("mnist1d", num_samples=500, seed=3).tensors("train")[0],
                       ds.tensors("train")[0])


def test_synthetic_shapes_and_seeds():
    ds = data.load("synthetic", shape=(4, 6), num_classes=3, num_train=5000, num_test=20)
    x, y = ds.tensors("train")
    assert x.shape == (5000, 4, 6) and ds.in_channels == 4 and ds.num_classes == 3
    assert set(y.tolist()) == {0, 1, 2}
    assert x.mean().item() == pytest.approx(0.0, abs=0.02)
    assert x.std().item() == pytest.approx(1.0, abs=0.02)
    same = data.load("synthetic", shape=(4, 6), num_classes=3, num_train=5000, num_test=20)
    assert torch.equal(same.tensors("train")[0], x)
    other = data.load("synthetic", shape=(4, 6), num_classes=3, num_train=5000, num_test=20,
                      seed=1)
    assert not torch.equal(other.tensors("train")[0], x)


# ------------------------------------------------------------------------- CIFAR file pipeline

def test_cifar10_download_path_reads_the_official_format(cifar10):
    ds, arrays, data_dir = cifar10
    assert (ds.name, ds.num_classes, ds.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert (ds.num_train, ds.num_test) == (5 * CIFAR10_TRAIN_PER_BATCH, CIFAR_TEST)
    for split in ("train", "test"):
        images, labels = arrays[split]
        inputs, got_labels = ds.tensors(split)
        torch.testing.assert_close(inputs.double(), _normalised(images), atol=1e-5, rtol=0)
        assert torch.equal(got_labels, torch.from_numpy(labels).long())
    # Archive, extracted directory and array cache, and no leftover temporary files.
    assert _entries(data_dir) == ["cifar-10-batches-py", "cifar-10-python.tar.gz",
                                        "cifar10.npz"]


def test_cifar10_reload_uses_the_array_cache(cifar10):
    ds, _, data_dir = cifar10
    again = data.load("cifar10", data_dir, url="file:///nonexistent/archive.tar.gz",
                      download=False)
    for split in ("train", "test"):
        assert torch.equal(again.tensors(split)[0], ds.tensors(split)[0])
        assert torch.equal(again.tensors(split)[1], ds.tensors(split)[1])


def test_cifar100_from_an_extracted_directory(tmp_path):
    archive = tmp_path / "mirror.tar.gz"
    arrays = _write_cifar100_archive(archive, seed=2)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")
    ds = data.load("cifar100", data_dir, download=False)
    assert (ds.num_classes, ds.num_train, ds.num_test) == (100, 250, CIFAR_TEST)
    torch.testing.assert_close(ds.tensors("test")[0].double(), _normalised(arrays["test"][0]),
                               atol=1e-5, rtol=0)
    assert torch.equal(ds.tensors("train")[1], torch.from_numpy(arrays["train"][1]).long())
    assert (data_dir / "cifar100.npz").is_file()


def test_md5_mismatch_on_download_leaves_nothing(cifar10_archive, tmp_path):
    archive, _ = cifar10_archive
    with pytest.raises(CorruptDataError, match="md5 .* expected 0{32}.*re-download"):
        data.load("cifar10", tmp_path, url=archive.as_uri(), md5="0" * 32, progress=False)
    assert _entries(tmp_path) == []


def test_unreachable_url_names_it_and_leaves_nothing(tmp_path):
    missing = (tmp_path / "mirror" / "cifar-10-python.tar.gz").as_uri()
    data_dir = tmp_path / "data"
    with pytest.raises(ConnectionError, match=f"cannot download {missing}"):
        data.load("cifar10", data_dir, url=missing, progress=False)
    assert _entries(data_dir) == []


def test_truncated_archive_is_a_clear_error_and_caches_nothing(cifar10_archive, tmp_path):
    archive, _ = cifar10_archive
    truncated = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    truncated.parent.mkdir()
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    data_dir = tmp_path / "data"
    # The checksum matches the truncated bytes, so the damage shows only when extracting.
    with pytest.raises(CorruptDataError,
                       match="cifar-10-python.tar.gz cannot be extracted.*delete"):
        data.load("cifar10", data_dir, url=truncated.as_uri(), md5=_md5(truncated),
                  progress=False)
    assert _entries(data_dir) == ["cifar-10-python.tar.gz"]


def test_damaged_archive_already_in_data_dir_fails_the_official_checksum(cifar10_archive,
                                                                         tmp_path):
    archive, _ = cifar10_archive
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes()[:1000])
    with pytest.raises(CorruptDataError, match="cifar-10-python.tar.gz has md5 .* delete it"):
        data.load("cifar10", tmp_path)
    assert _entries(tmp_path) == ["cifar-10-python.tar.gz"]


def test_corrupt_array_cache_names_the_file(tmp_path):
    (tmp_path / "cifar10.npz").write_bytes(b"not an npz file")
    with pytest.raises(CorruptDataError, match="cifar10.npz is unreadable.*delete it"):
        data.load("cifar10", tmp_path)


def test_missing_data_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz"):
        data.load("cifar100", tmp_path, download=False)
    assert _entries(tmp_path) == []


def test_data_dir_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("STARFAST_DATA", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    monkeypatch.delenv("STARFAST_DATA")
    assert data.resolve_data_dir(None) == Path.home() / ".cache" / "starfast"


# ------------------------------------------------------------------------- CIFAR augmentation

def _crop_flip_reference(image: np.ndarray, row: int, col: int, flip: int,
                         padding: int) -> np.ndarray:
    """Per-image reference: zero-pad, crop at (row, col) in the padded image, mirror."""
    size = image.shape[-1]
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    crop = padded[:, row:row + size, col:col + size]
    return crop[:, :, ::-1] if flip else crop


@pytest.mark.parametrize("device", DEVICES)
def test_random_crop_flip_matches_a_per_image_reference(rng, device):
    augmentation = RandomCropFlip(padding=4)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=rng, dtype=torch.uint8)
    params = augmentation.sample(64, rng)
    assert params.dtype == torch.int64 and params.shape == (64, 3)
    got = augmentation.apply(images.to(device), params.to(device)).cpu()
    assert got.dtype == torch.uint8
    for image, (row, col, flip), out in zip(images.numpy(), params.tolist(), got.numpy()):
        np.testing.assert_array_equal(out, _crop_flip_reference(image, row, col, flip, 4))


def test_random_crop_flip_controlled_cases():
    augmentation = RandomCropFlip(padding=4)
    image = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).reshape(2, 3, 32, 32) % 251 + 1
    centred = augmentation.apply(image, torch.tensor([[4, 4, 0], [4, 4, 1]]))
    assert torch.equal(centred[0], image[0])
    assert torch.equal(centred[1], image[1].flip(-1))
    corner = augmentation.apply(image, torch.tensor([[0, 8, 0], [8, 0, 1]]))
    assert (corner[0, :, :4] == 0).all() and (corner[0, :, :, 28:] == 0).all()
    assert torch.equal(corner[0, :, 4:, :28], image[0, :, :28, 4:])
    assert (corner[1, :, 28:] == 0).all() and (corner[1, :, :, 28:] == 0).all()
    assert torch.equal(corner[1, :, :28, :28], image[1, :, 4:, :28].flip(-1))


def test_random_crop_flip_samples_every_offset_and_both_flips(rng):
    params = RandomCropFlip(padding=4).sample(5000, rng)
    for column, values in ((0, range(9)), (1, range(9)), (2, range(2))):
        counts = torch.bincount(params[:, column], minlength=len(values))
        assert len(counts) == len(values)
        assert (counts > 0.7 * 5000 / len(values)).all()


def test_cifar_train_batches_augment_then_normalise_with_the_drawn_parameters(cifar10):
    ds, arrays, _ = cifar10
    images = torch.from_numpy(arrays["train"][0])
    batch_size = 32
    batches = list(ds.train_batches(batch_size, torch.Generator().manual_seed(11)))
    # Documented draw order: the permutation, then one parameter row per train example.
    replay = torch.Generator().manual_seed(11)
    order = torch.randperm(ds.num_train, generator=replay)
    params = RandomCropFlip(padding=4).sample(ds.num_train, replay)
    for i, (inputs, labels) in enumerate(batches):
        part = slice(i * batch_size, (i + 1) * batch_size)
        expected = [_crop_flip_reference(images[j].numpy(), *params[k].tolist(), padding=4)
                    for k, j in zip(range(part.start, part.stop), order[part].tolist())]
        torch.testing.assert_close(inputs.double(), _normalised(np.stack(expected)),
                                   atol=1e-5, rtol=0)
        assert torch.equal(labels, torch.from_numpy(arrays["train"][1])[order[part]].long())


def test_cifar_augmentation_changes_inputs_only_when_asked(cifar10):
    ds, arrays, _ = cifar10
    plain = next(ds.train_batches(100, torch.Generator().manual_seed(2), augment=False))[0]
    augmented = next(ds.train_batches(100, torch.Generator().manual_seed(2)))[0]
    assert not torch.equal(plain, augmented)
    low = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    high = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    for x in (plain, augmented):
        assert (x >= low - 1e-5).all() and (x <= high + 1e-5).all()
