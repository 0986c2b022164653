"""Evaluations without a training loop: k-NN, logistic regression (checked against scikit-learn), least squares."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from selagg_utils.features import TokenSet
from selagg_utils.linear_eval import knn_accuracy, logistic_probe_accuracy, position_accuracy, ridge_accuracy
from selagg_utils.models import TokenLayout


def overlapping_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of 3 overlapping Gaussian classes in 6 dimensions whose columns differ in scale by 1000x."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.randn(3, 6, generator=torch.Generator().manual_seed(99))
    x = centres[y] + 1.5 * torch.randn(n, 6, generator=g)
    return x * torch.tensor([1e-2, 0.1, 0.3, 1.0, 3.0, 10.0]), y


def scikit_learn_predictions(C: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test features, train labels, and LogisticRegression(C)'s test predictions on standardised features."""
    x, y = overlapping_classes(400, 0)
    xt, _ = overlapping_classes(400, 1)
    mean, std = x.double().mean(0), x.double().std(0)
    reference = LogisticRegression(C=C, max_iter=10_000, tol=1e-12).fit(((x - mean) / std).numpy(), y.numpy())
    return x, y, xt, torch.from_numpy(reference.predict(((xt - mean) / std).numpy()))


@pytest.mark.parametrize("C", [0.003, 0.03, 1.0, 100.0])
def test_logistic_probe_predicts_what_scikit_learn_predicts(C):
    """Same model as LogisticRegression(C) on standardised features, so the same test predictions.

    Scoring our probe against scikit-learn's predictions as if they were labels gives the share of
    test points on which the two agree. The loss is strictly convex, so both solvers aim at one
    optimum and stop very close to it (float64, tight tolerances); that can change the prediction
    only of a test point lying that close to a decision boundary. We allow one point in 400 (they
    agreed on all 400 at every C when this was written).
    """
    x, y, xt, theirs = scikit_learn_predictions(C)
    assert logistic_probe_accuracy(x, y, xt, theirs, C=C) >= 1 - 1 / 400


def test_the_comparison_with_scikit_learn_catches_a_penalty_off_by_ten_or_unstandardised_features():
    """With strong regularisation, a C ten times off moves more than one prediction in 400 (95-97.5 % agree)."""
    x, y, xt, theirs = scikit_learn_predictions(0.03)
    assert logistic_probe_accuracy(x, y, xt, theirs, C=0.3) < 1 - 1 / 400
    assert logistic_probe_accuracy(x, y, xt, theirs, C=0.003) < 1 - 1 / 400
    raw = LogisticRegression(C=0.03, max_iter=10_000).fit(x.numpy(), y.numpy()).predict(xt.numpy())
    assert (torch.from_numpy(raw) == theirs).double().mean() < 1 - 1 / 400  # standardising changes the model


def test_knn_logistic_and_ridge_agree_on_separable_data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.nn.functional.one_hot(y, 4).float() * 4 + torch.randn(200, 4, generator=g)
    assert knn_accuracy(x[:100], y[:100], x[100:], y[100:]) > 0.9
    assert logistic_probe_accuracy(x[:100], y[:100], x[100:], y[100:]) > 0.9
    batched = ridge_accuracy(torch.stack([x[:100], torch.randn(100, 4)]), y[:100],
                             torch.stack([x[100:], torch.randn(100, 4)]), y[100:])
    assert batched.shape == (2,) and batched[0] > 0.9 and batched[1] < 0.5




def test_position_probes_in_small_chunks_equal_one_large_chunk():
    """The chunk size bounds memory only: every position's accuracy is the same whatever it is."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(60, 1 + 16, 8, generator=g).half()
    labels = torch.arange(60) % 3
    train, test = TokenSet(tokens[:40], labels[:40], TokenLayout(True, 0, (4, 4))), TokenSet(tokens[40:], labels[40:], TokenLayout(True, 0, (4, 4)))
    assert torch.equal(position_accuracy(train, test, chunk=1), position_accuracy(train, test, chunk=16))
    assert position_accuracy(train, test).shape == (4, 4)


def test_ridge_is_the_closed_form_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(50, 5, generator=g), torch.randn(30, 5, generator=g)
    y, yt = torch.arange(50) % 3, torch.arange(30) % 3
    xs, xts = (x - x.mean(0)) / x.std(0), (xt - x.mean(0)) / x.std(0)
    target = np.eye(3)[y.numpy()] - 1 / 3
    w = np.linalg.solve(xs.double().numpy().T @ xs.double().numpy() + 2.0 * np.eye(5),
                        xs.double().numpy().T @ target)
    expected = float(((xts.double().numpy() @ w).argmax(1) == yt.numpy()).mean())
    assert float(ridge_accuracy(x, y, xt, yt, alpha=2.0)) == pytest.approx(expected, abs=1e-6)
