"""The registry of methods and each method's loss or weights against its closed form on planted data."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from diffinject.core import methods as registry
from diffinject.core.classifier import ClassifierConfig, build_classifier
from diffinject.core.methods.base import LossEMA, cap_extra_weight, relative_difficulty
from diffinject.core.methods.denetdm import DeNetDMParams, TwoBranch, branches, distillation_loss
from diffinject.core.methods.disent import DisEntClassifier, swap_features
from diffinject.core.methods.jtt import error_set, upsampled_order


def test_loss_ema_first_value_whole_then_decayed_and_class_normalised():
    labels = torch.tensor([0, 0, 1, 1])
    ema = LossEMA(labels, alpha=0.7)
    ema.update(torch.tensor([2.0, 4.0]), torch.tensor([0, 2]))  # first values are taken whole
    assert torch.allclose(ema.value, torch.tensor([2.0, 0.0, 4.0, 0.0]))
    ema.update(torch.tensor([1.0, 8.0, 1.0]), torch.tensor([0, 1, 3]))
    assert torch.allclose(ema.value, torch.tensor([0.7 * 2 + 0.3 * 1, 8.0, 4.0, 1.0]))
    # class 0's largest average is 8, class 1's is 4
    assert torch.allclose(ema.normalised(torch.arange(4)), torch.tensor([1.7 / 8, 1.0, 1.0, 0.25]))


def test_relative_difficulty_is_lb_over_lb_plus_ld():
    labels = torch.tensor([0, 0, 0])
    ema_b, ema_d = LossEMA(labels, 0.7), LossEMA(labels, 0.7)
    ema_b.update(torch.tensor([4.0, 1.0, 2.0]), torch.arange(3))  # the biased model fails sample 0
    ema_d.update(torch.tensor([1.0, 2.0, 2.0]), torch.arange(3))
    lb, ld = torch.tensor([1.0, 0.25, 0.5]), torch.tensor([0.5, 1.0, 1.0])
    w = relative_difficulty(ema_b, ema_d, torch.arange(3))
    assert torch.allclose(w, lb / (lb + ld), atol=1e-6)
    assert w.argmax() == 0  # the sample the shortcut gets wrong weighs most


def test_extra_samples_hold_at_most_their_share_of_the_weight():
    """cap_extra_weight scales only the extra samples, to exactly their share of the batch when over it."""
    w = torch.tensor([0.1, 0.2, 0.9, 0.8])
    from_extra = torch.tensor([False, False, True, True])  # half the batch, 1.7 of 2.0 weight
    capped = cap_extra_weight(w, from_extra)
    assert torch.equal(capped[:2], w[:2])  # the real samples keep their weights
    assert torch.allclose(capped[2:].sum() / capped.sum(), torch.tensor(0.5))
    assert torch.allclose(capped[2] / capped[3], w[2] / w[3])  # their order among themselves is kept
    under = torch.tensor([0.9, 0.8, 0.1, 0.2])
    assert torch.equal(cap_extra_weight(under, from_extra), under)  # under their share: untouched
    assert torch.equal(cap_extra_weight(w, torch.zeros(4, dtype=torch.bool)), w)  # no extra samples


class _Constant(nn.Module):
    """Predicts class 0 for every image."""

    def forward(self, x):
        return torch.tensor([10.0, 0.0, 0.0]).expand(len(x), 3)


def test_jtt_error_set_is_what_the_first_model_gets_wrong():
    labels = torch.tensor([0, 1, 0, 2, 2, 0])
    images = torch.zeros(6, 1, 2, 2, dtype=torch.uint8)
    assert error_set(_Constant(), images, labels).tolist() == [1, 3, 4]


def test_jtt_upsampling_weights_the_error_set_lambda_up_times():
    n, errors, lam = 100, torch.tensor([3, 7, 11, 50]), 20
    order = upsampled_order(n, errors, lam)
    g = torch.Generator().manual_seed(0)
    draws = torch.cat([order(e, g) for e in range(400)])
    assert all(len(order(0, g)) == n for _ in range(3))  # an epoch is as long as the training split
    share = torch.isin(draws, errors).float().mean().item()
    expected = lam * len(errors) / (n + (lam - 1) * len(errors))  # closed form: 80 / 176
    assert abs(share - expected) < 0.01
    counts = torch.bincount(draws, minlength=n).float()
    others = counts[~torch.isin(torch.arange(n), errors)]
    assert abs(counts[errors].mean().item() / others.mean().item() - lam) < 1.0


def test_disent_swap_keeps_labels_and_permutes_only_the_bias_features():
    z_i = torch.randn(5, 3, requires_grad=True)
    z_b = torch.randn(5, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4])
    perm = torch.tensor([2, 0, 1, 4, 3])
    mix_i, mix_b, y_i, y_b = swap_features(z_i, z_b, y, perm)
    assert torch.equal(mix_i[:, :3], z_i) and torch.equal(mix_i[:, 3:], z_b[perm])
    assert torch.equal(mix_b[:, :3], z_i) and torch.equal(mix_b[:, 3:], z_b[perm])
    assert torch.equal(y_i, y) and torch.equal(y_b, y[perm])  # C_i keeps the label, C_b follows its bias features
    # each classifier's gradient reaches only its own encoder's half
    mix_i.sum().backward(retain_graph=True)
    assert z_b.grad is None and torch.equal(z_i.grad, torch.ones_like(z_i))
    z_i.grad = None
    mix_b.sum().backward()
    assert z_i.grad is None and torch.equal(z_b.grad, torch.ones_like(z_b))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet18"])
def test_disent_predicts_from_both_encoders(arch):
    cfg = ClassifierConfig(arch=arch)
    model = DisEntClassifier(cfg, (3, 28, 28), 10).eval()
    x = torch.rand(2, 3, 28, 28)
    z_i, z_b = model.features(x)
    assert z_i.shape == z_b.shape and z_i.shape[1] * 2 == model.fc_intrinsic.in_features
    assert torch.allclose(model(x), model.fc_intrinsic(torch.cat([z_i, z_b], 1)))
    # the registry builds the same module to load a saved model into
    again = registry.get("disent").build(cfg, (3, 28, 28), 10)
    again.load_state_dict(model.state_dict())


def test_denetdm_experts_are_a_product_of_the_branches_predictions():
    """head(first + second) puts its probability where both branches do: softmax(z_1 + z_2 + b) is the normalised
    product of softmax(z_1 + b) (the first branch's prediction) and softmax(z_2) (the head on the second alone)."""
    torch.manual_seed(0)
    model = TwoBranch(nn.Linear(6, 5), nn.Linear(6, 5), 5, 3)
    x = torch.randn(4, 6)
    product = model(x).softmax(1) * (model.second(x) @ model.head.weight.T).softmax(1)
    assert torch.allclose(model.experts(x).softmax(1), product / product.sum(1, keepdim=True), atol=1e-6)


def test_denetdm_distillation_is_t_squared_cross_entropy_of_the_softened_predictions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    for t in (1.0, 2.0, 4.0):
        p, q = (teacher / t).softmax(1), (student / t).softmax(1)
        entropy, kl = -(p * p.log()).sum(1), (p * (p.log() - q.log())).sum(1)
        assert torch.allclose(distillation_loss(student, teacher, t), t ** 2 * (entropy + kl).mean(), atol=1e-5)
        assert torch.allclose(distillation_loss(teacher, teacher, t), t ** 2 * entropy.mean(), atol=1e-5)


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet18"])
def test_denetdm_branches_differ_in_depth_and_share_a_width(arch):
    shallow, deep, dim = branches(ClassifierConfig(arch=arch), (3, 28, 28), DeNetDMParams())
    x = torch.rand(2, 3, 28, 28)
    assert shallow(x).shape == deep(x).shape == (2, dim)
    depth = lambda m: sum(isinstance(layer, (nn.Linear, nn.Conv2d)) for layer in m.modules())  # noqa: E731
    assert depth(shallow) < depth(deep)
    if arch == "mlp":  # the reference's Colored MNIST branches: 2 and 4 layers of width 100
        assert (depth(shallow), depth(deep), dim) == (2, 4, 100)
    with pytest.raises(ValueError, match="shallow_depth < deep_depth"):
        registry.get("denetdm", {"shallow_depth": 4})


def test_denetdm_keeps_the_bias_branch_frozen_in_stage_2(planted, monkeypatch):
    """Stage 2 trains the target branch and the head, never the deep (bias) branch it starts from."""
    from diffinject.core.methods import denetdm

    seen = []
    real = denetdm.train_loop
    monkeypatch.setattr(denetdm, "train_loop", lambda model, *a, **k: seen.append(
        {n: v.clone() for n, v in model.state_dict().items()}) or real(model, *a, **k))
    out = registry.get("denetdm").fit(planted(), planted(80, seed=1), 2, ClassifierConfig(epochs=2, batch_size=32),
                                      seed=0, progress=False)
    before, after = seen[1], out.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("second."))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("first."))


@pytest.mark.parametrize("name", [n for n, m in registry.REGISTRY.items() if m.extra is None])
def test_every_label_free_learner_learns_a_planted_task_reproducibly(name, planted):
    train, valid = planted(), planted(80, seed=1)
    cfg = ClassifierConfig(epochs=3, batch_size=32)
    seen = []
    a = registry.get(name).fit(train, valid, 2, cfg, seed=0, progress=False, on_epoch=lambda e, acc: seen.append(acc))
    b = registry.get(name).fit(train, valid, 2, cfg, seed=0, progress=False)
    assert len(seen) == 3 and max(seen) > 0.9  # every method reports each epoch to Tune and learns the task
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lff_caps_the_extra_samples_it_is_told_of_and_only_when_asked(planted, monkeypatch):
    """fit_method marks the extra data's samples; LfF + DiffInject caps exactly those by default, plain LfF only when
    asked, DisEnt + DiffInject when asked."""
    import diffinject.core.methods.base as base
    from diffinject.core.stages import fit_method

    train, extra, valid = planted(64), planted(32, seed=2), planted(32, seed=1)
    seen = []
    monkeypatch.setattr(base, "cap_extra_weight", lambda w, mask: seen.append(mask.clone()) or w)
    cfg = ClassifierConfig(epochs=1, batch_size=96)  # one batch holds every sample
    fit = lambda method: fit_method(method, train, (extra.images, extra.labels), valid, 2, cfg, 0, progress=False)
    fit(registry.get("lff+diffinject", {"cap_extra_weight": False}))
    fit(registry.get("lff"))
    assert not seen  # off when turned off, and off for LfF itself: its rows are LfF's own weights
    fit(registry.get("lff+diffinject"))  # on by default: uncapped, the synthetic samples took 87 % of the weight
    assert len(seen) == 1 and int(seen[0].sum()) == 32  # the batch's 32 synthetic samples, nothing else
    fit(registry.get("disent+diffinject"))
    assert len(seen) == 1  # DisEnt keeps its own weights unless asked
    fit(registry.get("disent+diffinject", {"cap_extra_weight": True}))
    assert len(seen) == 2 and int(seen[1].sum()) == 32


def test_biased_loss_is_the_gce_of_the_samples_it_learns_from_only():
    """biased_loss: the GCE mean over the kept rows, no gradient through the others, 0 when none are kept."""
    from diffinject.core.classifier import gce_loss
    from diffinject.core.methods.lff import biased_loss

    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    targets, learns = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([True, False, True, True, False, False])
    loss = biased_loss(logits, targets, 0.7, learns)
    assert torch.allclose(loss, gce_loss(logits[learns], targets[learns], 0.7))
    loss.backward()
    assert torch.equal(logits.grad[~learns], torch.zeros(3, 3)) and logits.grad[learns].abs().sum() > 0
    none = biased_loss(logits, targets, 0.7, torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_lff_diffinject_biased_model_learns_from_the_real_samples_only(planted, monkeypatch):
    """On real + synthetic, lff+diffinject's biased model learns from the batch's real samples only (its default);
    plain LfF's, and lff+diffinject's when asked, from every sample."""
    import diffinject.core.methods.lff as lff
    from diffinject.core.stages import fit_method

    train, extra, valid = planted(64), planted(32, seed=2), planted(32, seed=1)
    seen = []
    real = lff.biased_loss
    monkeypatch.setattr(lff, "biased_loss", lambda logits, y, q, learns: seen.append(learns.clone()) or real(
        logits, y, q, learns))
    cfg = ClassifierConfig(epochs=1, batch_size=96)  # one batch holds every sample
    fit = lambda method: fit_method(method, train, (extra.images, extra.labels), valid, 2, cfg, 0, progress=False)
    fit(registry.get("lff+diffinject", {"biased_learns_extra": True}))
    fit(registry.get("lff"))
    assert not seen  # plain LfF's biased model learns from every sample it is given
    fit(registry.get("lff+diffinject"))
    assert len(seen) == 1 and len(seen[0]) == 96 and int(seen[0].sum()) == 64  # the 64 real samples of the batch


def test_lff_biased_model_takes_its_own_architecture_when_given_one(planted, monkeypatch):
    """biased_arch: LfF builds its biased model with that architecture and its debiased model with the shared one."""
    import diffinject.core.methods.lff as lff
    from diffinject.core.stages import fit_method

    built = []
    monkeypatch.setattr(lff, "build_classifier", lambda cfg, *a: built.append(cfg.arch) or build_classifier(cfg, *a))
    train, valid = planted(32), planted(16, seed=1)
    cfg = ClassifierConfig(arch="mlp", epochs=1, batch_size=32)
    for params in ({"biased_arch": "cnn"}, None):
        fit_method(registry.get("lff", params), train, None, valid, 2, cfg, 0, progress=False)
    assert built == ["cnn", "mlp", "mlp", "mlp"]  # (biased, debiased) with the setting, then without it
    for name in ("lff", "lff+diffinject"):
        with pytest.raises(ValueError, match="biased_arch 'vit' must be one of mlp, cnn, resnet18, auto"):
            registry.get(name, {"biased_arch": "vit"})
    from diffinject.core.config import make_config

    for section in ({"mining": {"classifier": {"arch": "vit"}}}, {"classifier": {"arch": "vit"}}):
        with pytest.raises(ValueError, match="classifier arch 'vit' must be one of mlp, cnn, resnet18, auto"):
            make_config("default", section)


def test_registry_names_every_method_once_with_defaults_in_one_place():
    assert list(registry.REGISTRY)[:4] == ["vanilla", "lff", "jtt", "disent"]
    for name, cls in registry.REGISTRY.items():
        method = registry.get(name)
        assert method.name == name and method.label
        assert method.extra in (None, "diffinject", "diffinject-corpus", "oracle")
    assert registry.get("jtt", {"lambda_up": 7}).params.lambda_up == 7
    assert registry.get("disent").params.lambda_dis_align == 10.0  # the reference's Colored MNIST setting


def test_unknown_method_or_hyperparameter_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown method 'magic'; choose from vanilla, lff, jtt, disent"):
        registry.get("magic")
    with pytest.raises(ValueError, match="unknown hyperparameter.* lamda_up for method 'jtt'"):
        registry.get("jtt", {"lamda_up": 5})
    with pytest.raises(ValueError, match="must be a mapping"):
        registry.get("jtt", 5)


def test_methods_flag_accepts_exactly_the_registry(capsys):
    from diffinject.workers.cli import build_parser, main

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    methods_help = next(a.help for a in run._actions if a.dest == "methods")
    assert all(name in methods_help for name in registry.REGISTRY)
    assert main(["run", "--preset", "quick", "--methods", "jtt,magic", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown method 'magic'" in err


def test_build_classifier_unchanged_by_the_encoder_split():
    """build_encoder strips the head of the same backbone the other methods train (same parameters otherwise)."""
    from diffinject.core.classifier import build_encoder

    cfg = ClassifierConfig(arch="mlp")
    enc, dim = build_encoder(cfg, (3, 28, 28))
    full = build_classifier(cfg, (3, 28, 28), 10)
    assert dim == 16 and enc(torch.rand(2, 3, 28, 28)).shape == (2, 16)
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in full.parameters()) - (16 * 10 + 10)


def test_a_new_method_is_one_class_and_one_registry_entry(monkeypatch, tmp_path, cmnist):
    """A method defined outside the pipeline, once registered, runs from a run's methods with no other change."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from diffinject.core.classifier import train_classifier
    from diffinject.core.config import make_config
    from diffinject.core.run import Run

    @dataclass
    class SmoothParams:
        smoothing: float = 0.1

    class Smooth(registry.Method):
        name, label, Params = "smooth", "Label smoothing", SmoothParams

        def fit(self, train, valid, num_classes, cfg, seed, device="cpu", progress=True, on_epoch=None):
            assert (train.bias == -1).all()  # the pipeline blanks the bias labels before any method sees them
            loss = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=self.params.smoothing)  # noqa: E731
            return registry.Trained(train_classifier(train.images, train.labels, valid.images, valid.labels, cfg,
                                                     num_classes, seed, loss_fn=loss, progress=False))

    monkeypatch.setitem(registry.REGISTRY, "smooth", Smooth)
    cfg = make_config("quick", {"methods": ["vanilla", "smooth"], "hparams": {"smooth": {"smoothing": 0.2}}})
    metrics = Run(tmp_path / "run", cfg, progress=False, dataset=cmnist).all()
    assert set(metrics["methods"]) == {"vanilla", "smooth"}
    assert metrics["methods"]["smooth"]["params"] == {"smoothing": 0.2}
    assert (tmp_path / "run" / "classifiers" / "smooth.pt").exists()
