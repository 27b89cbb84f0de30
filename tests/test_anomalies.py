"""Anomaly detection on real (timm, pretrained=False) models: DoG-initialised ones stand in for
structured, trained layers; Gaussian noise for a layer that lost or never had its patterns."""

import dataclasses
import json

import pytest
import timm
import torch

import kernelwatch as kw
from kernelwatch.anomalies import (
    Anomaly,
    AnomalyConfig,
    AnomalyDetector,
    AnomalyError,
    detect,
    severity_at_least,
)
from kernelwatch.format import check_anomalies, encode_json

NOISY = "blocks.3.1.conv_dw"  # a 3x3 layer of 480 kernels in the middle of efficientnet_b0


def layers_of(model: torch.nn.Module) -> dict:
    return {layer.name: layer for layer in kw.analyze(model).layers}


def dog_model(name: str = "efficientnet_b0") -> torch.nn.Module:
    torch.manual_seed(0)
    return kw.init.dog_(timm.create_model(name, pretrained=False), seed=0)


def with_noise(model: torch.nn.Module, layer: str, share: float = 1.0, seed: int = 1) -> torch.nn.Module:
    """Replace ``share`` of the layer's kernels by i.i.d. Gaussian kernels of the same spread."""
    weight = model.get_submodule(layer).weight
    gen = torch.Generator().manual_seed(seed)
    n = round(share * weight.shape[0])
    with torch.no_grad():
        weight[:n] = weight.std() * torch.randn(weight[:n].shape, generator=gen)
    return model


@pytest.fixture(scope="module")
def healthy() -> dict:
    return layers_of(dog_model())


@pytest.fixture(scope="module")
def one_noise_layer() -> dict:
    return layers_of(with_noise(dog_model(), NOISY))


def test_healthy_dog_initialised_models_raise_nothing(healthy):
    assert detect(0, healthy) == []
    assert detect(0, layers_of(dog_model("convnext_atto"))) == []


def test_a_noise_layer_in_a_structured_model_is_flagged_memorisation_like(one_noise_layer):
    flags = detect(7, one_noise_layer)
    assert [(a.step, a.layer, a.kind, a.severity) for a in flags] == [(7, NOISY, "memorisation", "warning")]
    numbers = flags[0].numbers
    assert numbers["clustered_fraction"] == one_noise_layer[NOISY].clustered_fraction <= 0.05
    assert numbers["null_level"] == pytest.approx(kw.Spectrum.pretrained(3).provenance["shuffled_false_positive_rate"])
    assert numbers["others_above_chance"] > 0.65 and numbers["smooth_null"] <= numbers["null_level"]
    assert NOISY in flags[0].message and "%" in flags[0].message


def test_the_outlier_rule_alone_also_catches_the_noise_layer(one_noise_layer):
    # With the memorisation rule switched off, the neighbours' comparison must still see it.
    flags = detect(0, one_noise_layer, config=AnomalyConfig(null_margin=-1.0))
    assert [(a.layer, a.kind) for a in flags] == [(NOISY, "outlier")]
    numbers = flags[0].numbers
    assert numbers["neighbours_median"] > 0.8 and numbers["n_neighbours"] == 4
    assert numbers["robust_z"] >= AnomalyConfig().outlier_z


def test_a_partly_noisy_layer_is_an_outlier_not_memorisation_like():
    # Like HorNet-tiny's layer 14 (appendix E): far fewer clustered kernels than its neighbours,
    # yet above the null level.
    layers = layers_of(with_noise(dog_model(), NOISY, share=0.75))
    flags = detect(0, layers)
    assert [(a.layer, a.kind) for a in flags] == [(NOISY, "outlier")]
    assert 0.1 < flags[0].numbers["clustered_fraction"] < 0.5 * flags[0].numbers["neighbours_median"]


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0", "mobilenetv3_large_100"])
def test_random_init_models_raise_no_structure_flags(name):
    torch.manual_seed(0)
    layers = layers_of(timm.create_model(name, pretrained=False))
    assert max(layer.clustered_fraction for layer in layers.values()) < 0.1  # really unstructured
    assert detect(0, layers) == []


def test_regression_fires_when_a_layer_turns_to_noise_and_not_for_small_fluctuations(healthy):
    detector = AnomalyDetector()
    assert detector.update(0, healthy) == []
    # Every kernel of every layer blurred by noise of 10 % of its own spread: a fluctuation.
    model = dog_model()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in healthy:
            w = model.get_submodule(name).weight
            w += 0.1 * w.flatten(1).std(dim=1).reshape(-1, 1, 1, 1) * torch.randn(w.shape, generator=gen)
    fluctuated = layers_of(model)
    assert fluctuated != healthy
    assert detector.update(1, fluctuated) == []
    flags = detector.update(2, layers_of(with_noise(model, NOISY)))
    regression = [a for a in flags if a.kind == "regression"]
    assert [a.layer for a in regression] == [NOISY]
    numbers = regression[0].numbers
    assert numbers["previous_best"] == max(healthy[NOISY].clustered_fraction, fluctuated[NOISY].clustered_fraction)
    assert numbers["drop"] == pytest.approx(numbers["previous_best"] - numbers["clustered_fraction"])
    assert numbers["drop"] > 0.5


def test_no_regression_from_an_unstructured_start():
    torch.manual_seed(0)
    random_layers = layers_of(timm.create_model("mobilenetv3_large_100", pretrained=False))
    history = [{name: layer.clustered_fraction for name, layer in random_layers.items()}]
    assert detect(1, random_layers, history) == []


def test_nan_and_dead_kernels_are_invalid_with_graded_severity():
    model = dog_model("mobilenetv3_large_100")
    with torch.no_grad():
        model.get_submodule("blocks.2.1.conv_dw").weight.fill_(float("nan"))  # all 120 NaN
        model.get_submodule("blocks.3.0.conv_dw").weight[:80] = 0.0  # 80 of 240 dead
        model.get_submodule("blocks.4.0.conv_dw").weight[:1] = float("inf")  # 1 of 480
    flags = detect(3, layers_of(model))
    assert [(a.layer, a.kind, a.severity) for a in flags] == [
        ("blocks.2.1.conv_dw", "invalid", "error"),
        ("blocks.3.0.conv_dw", "invalid", "warning"),
        ("blocks.4.0.conv_dw", "invalid", "info"),
    ]  # and the all-NaN layer is not also called memorisation-like
    assert flags[0].numbers == {"n_invalid": 120.0, "n_kernels": 120.0, "invalid_fraction": 1.0}
    assert flags[1].numbers["invalid_fraction"] == pytest.approx(80 / 240)


def test_to_dict_is_a_valid_tensorboard_anomaly_record(one_noise_layer):
    flags = detect(7, one_noise_layer) + detect(7, one_noise_layer, config=AnomalyConfig(null_margin=-1.0))
    records = [a.to_dict() for a in flags]
    assert check_anomalies(json.loads(encode_json(records))) == records
    assert set(records[0]) == {"step", "layer", "kind", "severity", "message", "numbers"}
    assert records[0]["step"] == 7


def test_state_dict_round_trip_continues_the_history(healthy, one_noise_layer):
    before = AnomalyDetector()
    before.update(0, healthy)
    state = json.loads(json.dumps(before.state_dict()))
    resumed = AnomalyDetector()
    # Fresh: no history, so no regression; nothing held at a snapshot before, so no memorisation yet.
    assert resumed.update(1, one_noise_layer) == [] and [a.kind for a in detect(1, one_noise_layer)] == ["memorisation"]
    resumed = AnomalyDetector()
    resumed.load_state_dict(state)
    # The regression is against the best of the loaded history; memorisation-like holds from
    # the second snapshot in a row on.
    assert {a.kind for a in resumed.update(1, one_noise_layer) if a.layer == NOISY} == {"regression"}
    assert {a.kind for a in resumed.update(2, one_noise_layer) if a.layer == NOISY} == {"memorisation", "regression"}
    with pytest.raises(kw.KernelWatchError):
        resumed.load_state_dict({"history": []})


def test_severity_policy_and_the_exception():
    flags = [Anomaly(1, "a", "outlier", "warning", "m", {}), Anomaly(1, "b", "invalid", "error", "n", {})]
    assert [severity_at_least(a, "warning") for a in flags] == [True, True]
    assert [severity_at_least(a, "error") for a in flags] == [False, True]
    assert all(severity_at_least(a, "info") for a in flags)
    with pytest.raises(kw.KernelWatchError):
        severity_at_least(flags[0], "fatal")
    with pytest.raises(kw.KernelWatchError):
        Anomaly(1, "a", "outlier", "critical", "m", {})
    err = AnomalyError(flags)
    assert isinstance(err, kw.KernelWatchError) and err.anomalies == flags and "[error] n" in str(err)


def test_layers_with_few_kernels_are_not_judged(one_noise_layer):
    tiny = dict(one_noise_layer)
    config = AnomalyConfig(min_kernels=one_noise_layer[NOISY].n_kernels + 1)
    assert all(a.layer != NOISY for a in detect(0, tiny, config=config))


def test_the_update_lens_arms_the_rules_while_the_weights_are_still_random():
    """Random weights everywhere (nothing to judge in the weights lens); structured updates in
    every layer but one, whose update is noise: only that layer is flagged, as an outlier of the
    update lens (one layer's update at chance alone is no memorisation: healthy layers lag too)."""
    torch.manual_seed(0)
    start = timm.create_model("convnext_atto", pretrained=False)
    updates = kw.init.dog_(timm.create_model("convnext_atto", pretrained=False), seed=0)
    noisy = "stages.2.blocks.3.conv_dw"
    with_noise(updates, noisy)
    weights = layers_of(start)
    assert detect(5, weights) == []
    flags = detect(5, weights, updates=layers_of(updates))
    assert [(a.layer, a.kind, a.numbers["update_lens"]) for a in flags] == [(noisy, "outlier", 1.0)]
    assert "updates since the first snapshot" in flags[0].message
    assert detect(5, weights, updates=layers_of(kw.init.dog_(updates, seed=1))) == []
    # The detector reports such a flag once it holds at two snapshots in a row.
    detector = AnomalyDetector()
    assert detector.update(5, weights, layers_of(with_noise(updates, noisy))) == []
    assert [a.layer for a in detector.update(6, weights, layers_of(updates))] == [noisy]
    resumed = AnomalyDetector()
    resumed.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert [a.layer for a in resumed.update(7, weights, layers_of(updates))] == [noisy]


def test_updates_at_chance_in_the_first_half_of_the_model_are_memorisation_like():
    """What memorising trainings showed (benchmarks/validate_memorisation.py): patterns written
    into the later layers only. A model-level flag, with its figures; none while the later
    layers are unstructured too, none when every layer's update is structured."""
    torch.manual_seed(0)
    weights = layers_of(timm.create_model("convnext_atto", pretrained=False))
    updates = kw.init.dog_(timm.create_model("convnext_atto", pretrained=False), seed=0)
    names = list(layers_of(updates))
    for name in names[: len(names) // 2]:
        with_noise(updates, name)
    flags = detect(5, weights, updates=layers_of(updates))
    assert [(a.layer, a.kind, a.numbers["update_lens"]) for a in flags] == [(None, "memorisation", 1.0)]
    numbers = flags[0].numbers
    assert numbers["early_above_chance"] <= 0.05 and numbers["late_above_chance"] > 0.5
    assert (numbers["n_early"], numbers["n_late"]) == (len(names) // 2, len(names) - len(names) // 2)
    assert "first 6 depthwise layers" in flags[0].message and names[0] in flags[0].message
    detector = AnomalyDetector()
    assert detector.update(5, weights, layers_of(updates)) == []
    assert [(a.layer, a.kind) for a in detector.update(6, weights, layers_of(updates))] == [(None, "memorisation")]
    resumed = AnomalyDetector()
    resumed.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert [a.layer for a in resumed.update(7, weights, layers_of(updates))] == [None]
    for name in names:
        with_noise(updates, name)
    assert detect(5, weights, updates=layers_of(updates)) == []


def test_the_update_lens_is_not_judged_once_the_weights_are_structured(healthy):
    """A DoG-initialised model trains with small, patternless updates in some layers: its
    structured weights are judged, not its updates."""
    noise = {name: dataclasses.replace(layer) for name, layer in healthy.items()}
    for layer in noise.values():
        layer.clustered_fraction = 0.25
    first = next(iter(noise))
    noise[first].clustered_fraction = 0.0
    assert detect(5, healthy, updates=noise) == []
