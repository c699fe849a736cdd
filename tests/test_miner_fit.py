"""The biased model on your own data trains on while it still fits its training images (core.mining.StillFitting)."""

import pytest
import torch
from torch import nn

from diffinject.core import classifier
from diffinject.core.classifier import ClassifierConfig
from diffinject.core.config import make_config
from diffinject.core.mining import MiningConfig, StillFitting, train_biased


class Scripted(nn.Module):
    """A 'model' whose training error is set by hand: it gets the first ``wrong`` samples wrong."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.wrong = n, 0

    def forward(self, x):
        logits = torch.zeros(len(x), 2)
        logits[:, 1] = 1.0  # every label below is 1: right unless flipped
        logits[: self.wrong, 0] = 2.0
        return logits


def _drive(errors: dict[int, float], start: int, last: int) -> tuple[int, StillFitting]:
    """Feed ``StillFitting`` a model with the given training error after each epoch (held between the given ones);
    return the epoch count at which it ends training (or ``last``)."""
    n = 1000
    model, labels = Scripted(n), torch.ones(n, dtype=torch.long)
    until = StillFitting(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), labels, start)
    error = 1.0
    for epoch in range(last):
        error = errors.get(epoch + 1, error)
        model.wrong = round(error * n)
        if until(epoch, model):
            return epoch + 1, until
    return last, until


def test_it_stops_at_the_first_check_whose_error_fell_by_no_more_than_a_tenth_over_twenty_epochs():
    errors = {30: 0.20, 40: 0.15, 50: 0.10, 60: 0.08, 70: 0.085, 80: 0.079, 90: 0.01}
    stopped, until = _drive(errors, start=50, last=300)
    # 50 against 30: halved; 60 against 40; 70 against 50 (0.085 < 0.09): still fitting; 80 against 60: 0.079 >= 0.072
    assert stopped == 80 and until.epochs == 80
    assert until.errors == pytest.approx({30: 0.20, 40: 0.15, 50: 0.10, 60: 0.08, 70: 0.085, 80: 0.079})


def test_it_ends_at_the_budget_where_the_error_has_stopped_falling_and_where_nothing_can_be_compared():
    assert _drive({1: 0.3, 25: 0.05}, start=50, last=300)[0] == 50  # 0.05 at 30 and at 50: already fitted
    assert _drive({1: 0.0}, start=50, last=300)[0] == 50  # an error of 0 cannot fall
    assert _drive({1: 0.5, 10: 0.1}, start=20, last=300)[0] == 20  # no check 20 epochs before its 20th
    assert _drive({1: 0.5}, start=4, last=300)[0] == 4  # the quick preset's 4 epochs stay 4


def _cfg(epochs: int, max_epochs: int, lr: float = 1e-3) -> MiningConfig:
    return MiningConfig(classifier=ClassifierConfig(arch="mlp", epochs=epochs, batch_size=64, lr=lr),
                        max_epochs=max_epochs)


def test_a_biased_model_that_has_fitted_by_its_budget_has_the_weights_of_a_fixed_budget(planted):
    data = planted(240, 0)  # learnt in a few epochs: the error is flat from 10 to 30
    fixed = train_biased(data.images, data.labels, 2, _cfg(30, 0), seed=0, progress=False)
    free = train_biased(data.images, data.labels, 2, _cfg(30, 200), seed=0, progress=False)
    assert fixed.epochs == free.epochs == 30
    a, b = fixed.model.state_dict(), free.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_biased_model_still_fitting_trains_on_and_a_rerun_after_its_stop_trains_nothing(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)  # noise with random labels: memorised slowly, still falling at 30 epochs
    labels = torch.randint(0, 2, (240,), generator=g)
    images = torch.randint(0, 255, (240, 3, 28, 28), generator=g, dtype=torch.uint8)
    cfg = _cfg(30, 120, lr=3e-4)
    checkpoint = tmp_path / "biased.ckpt.pt"
    made = train_biased(images, labels, 2, cfg, seed=0, progress=False, checkpoint=checkpoint)
    assert 30 < made.epochs < 120 and made.epochs % 10 == 0
    assert made.errors[30] < 0.9 * made.errors[10]  # why it went on
    assert made.errors[made.epochs] >= 0.9 * made.errors[made.epochs - 20]  # why it stopped
    saves = []
    monkeypatch.setattr(classifier, "save_torch", lambda path, obj: saves.append(path))
    again = train_biased(images, labels, 2, cfg, seed=0, progress=False, checkpoint=checkpoint)
    assert saves == [] and again.epochs == made.epochs and again.errors == made.errors
    a, b = made.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_your_own_data_trains_the_miner_until_it_fits_and_the_benchmarks_keep_their_budget(tmp_path):
    assert make_config("default", {"data": str(tmp_path)}).mining.max_epochs == 300
    assert make_config("default", {"data": str(tmp_path), "mining": {"max_epochs": 0}}).mining.max_epochs == 0
    assert make_config("default").mining.max_epochs == 0
    assert make_config("table", {"dataset": "corrupted_mnist"}).mining.max_epochs == 0
