"""The paper's 2-D binary task of class-conditional Gaussians (Appendix A.2.2).

The paper specifies only the form D = {(x_i, y_i)}, x_i ~ N(mu_{y_i}, Sigma), x in R^2,
y in {0, 1}; it gives neither the means nor the covariance. We choose, by default,

    mu_0 = (-3, -3),  mu_1 = (+3, +3),  Sigma = I_2,

i.e. means symmetric about the origin, because the networks studied there are two-layer
*linear* networks without biases (f(x) = theta_1^T theta_2 x), whose decision boundary passes
through the origin; and classes that are separable in practice, because the paper's solutions
are models with loss ~ 0 (Section 3.1, Theorem 1): with overlapping classes (e.g. means
±(1, 1), Bayes error ~7.9%) every barrier of Tables 3-4 is ~100x larger and the eps = 1e-6
column is all zeros (see README). `mean` (mu_1, with mu_0 = -mu_1) and `covariance` are keyword
arguments. Classes are balanced (labels alternate 0, 1, 0, ...); inputs are used as drawn,
without normalisation, so the data is exactly the stated generative model. The train split is
drawn before the test split from one CPU generator seeded with `seed`.

:func:`sample_inputs` is the one sampler of this task; the theory experiments use it too.
"""
from __future__ import annotations

from typing import Sequence

import torch

from starfast.data.dataset import TensorDataset


DEFAULT_MEAN = (3.0, 3.0)
IDENTITY = ((1.0, 0.0), (0.0, 1.0))


def sample_inputs(labels: torch.Tensor, generator: torch.Generator, mean: Sequence[float] = DEFAULT_MEAN,
                  covariance: Sequence[Sequence[float]] = IDENTITY) -> torch.Tensor:
    """float64 inputs ``x ~ N((2y - 1) * mean, covariance)`` for the given 0/1 ``labels``."""
    class_one_mean = torch.tensor(mean, dtype=torch.float64)
    sigma = torch.tensor(covariance, dtype=torch.float64)
    if class_one_mean.shape != (2,) or sigma.shape != (2, 2):
        raise ValueError(f"mean must have 2 entries and covariance be 2x2, got "
                         f"{tuple(class_one_mean.shape)} and {tuple(sigma.shape)}")
    factor, info = torch.linalg.cholesky_ex(sigma)
    if info != 0 or not torch.equal(sigma, sigma.T):
        raise ValueError(f"covariance must be symmetric positive definite, got {covariance}")
    noise = torch.randn(labels.numel(), 2, dtype=torch.float64, generator=generator)
    return (2 * labels.double() - 1)[:, None] * class_one_mean + noise @ factor.T


def load_gaussians(device: torch.device | str = "cpu", *, num_train: int = 1000,
                   num_test: int = 1000, seed: int = 0, mean: Sequence[float] = DEFAULT_MEAN,
                   covariance: Sequence[Sequence[float]] = IDENTITY,
                   ) -> TensorDataset:
    """Draw `num_train` + `num_test` points of the binary Gaussian task (see module docstring)."""
    for name, count in (("num_train", num_train), ("num_test", num_test)):
        if count < 1:
            raise ValueError(f"{name} must be a positive int, got {count}")
    generator = torch.Generator().manual_seed(seed)

    def draw(count: int):
        labels = torch.arange(count) % 2
        return sample_inputs(labels, generator, mean, covariance).to(torch.float32), labels

    train_inputs, train_labels = draw(num_train)
    test_inputs, test_labels = draw(num_test)
    return TensorDataset("gaussians", train_inputs, train_labels, test_inputs, test_labels,
                         num_classes=2, device=device, binary=True)
