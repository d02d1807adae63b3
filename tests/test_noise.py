"""The noise engine: independent streams, in-place perturbation, exact restore in every dtype."""
import pytest
import torch
from torch import nn

from esnb.noise import ParameterSet, add_noise_, noise_correlation, noise_like, perturbed, stream_seed


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)).to(dtype)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _same_bits(model, snap):
    return all(p.dtype == s.dtype and torch.equal(p, s) for p, s in zip(model.parameters(), snap))


def test_noise_is_a_pure_function_of_seed_and_index():
    t = torch.empty(3, 5)
    assert torch.equal(noise_like(t, 7, 2), noise_like(t, 7, 2))
    assert not torch.equal(noise_like(t, 7, 2), noise_like(t, 7, 3))
    assert not torch.equal(noise_like(t, 7, 2), noise_like(t, 8, 2))
    # seed + index must not alias (a naive seed+i scheme would make these equal)
    assert stream_seed(5, 0) != stream_seed(4, 1)
    assert not torch.equal(noise_like(t, 5, 0), noise_like(t, 4, 1))


@pytest.mark.parametrize("pair", [((3, 0), (3, 1)), ((3, 0), (4, 0)), ((5, 0), (4, 1)), ((0, 0), (1, 0))])
def test_streams_are_uncorrelated(pair):
    (sa, ia), (sb, ib) = pair
    # 40k samples: the correlation of independent streams has std 1/200 = 0.005
    assert abs(noise_correlation((200, 200), sa, ia, sb, ib)) < 0.025


def test_noise_is_standard_gaussian():
    e = noise_like(torch.empty(100_000), 11, 0)
    assert abs(float(e.mean())) < 0.02 and abs(float(e.std()) - 1) < 0.02


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_perturb_restore_is_exact_over_many_cycles(dtype):
    model = _model(dtype)
    snap = _snapshot(model)
    ps = ParameterSet(model)
    for cycle in range(200):
        with ps.perturbed(seed=cycle, sigma=1e-3 * (1 if cycle % 2 else -1)):
            assert not _same_bits(model, snap)
    assert _same_bits(model, snap)
    # the standalone context manager too
    for cycle in range(20):
        with perturbed(model, seed=cycle, sigma=1e-2):
            pass
    assert _same_bits(model, snap)


def test_perturbed_values_are_master_plus_sigma_eps():
    model = _model(torch.float32)
    snap = _snapshot(model)
    with perturbed(model, 42, 0.01):
        for i, (p, s) in enumerate(zip(model.parameters(), snap)):
            assert torch.equal(p, s + 0.01 * noise_like(s, 42, i))


def test_bf16_perturbation_is_rounded_once_from_float32():
    model = _model(torch.bfloat16)
    ps = ParameterSet(model)
    assert all(m.dtype == torch.float32 for m in ps.master)
    with ps.perturbed(3, 1e-3):
        for i, (p, m) in enumerate(zip(model.parameters(), ps.master)):
            assert torch.equal(p, (m + 1e-3 * noise_like(m, 3, i)).to(torch.bfloat16))


def test_subtract_restore_drifts_in_bf16_but_ours_does_not():
    model = _model(torch.bfloat16)
    snap = _snapshot(model)
    for cycle in range(10):
        add_noise_(model, cycle, 1e-3)
        add_noise_(model, cycle, -1e-3)
    drift = max(float((p.detach().float() - s.float()).abs().max()) for p, s in zip(model.parameters(), snap))
    assert drift > 0  # the naive scheme does not give the weights back
    model2 = _model(torch.bfloat16)
    for cycle in range(10):
        with perturbed(model2, cycle, 1e-3):
            pass
    assert _same_bits(model2, snap)


def test_restore_on_exception():
    model = _model(torch.bfloat16)
    snap = _snapshot(model)
    ps = ParameterSet(model)
    with pytest.raises(ZeroDivisionError):
        with ps.perturbed(1, 0.1):
            1 / 0
    assert _same_bits(model, snap) and ps.perturbed_by is None
    with pytest.raises(KeyError):
        with perturbed(model, 2, 0.1):
            raise KeyError("boom")
    assert _same_bits(model, snap)


def test_double_perturb_is_refused():
    ps = ParameterSet(_model())
    ps.perturb(1, 0.1)
    with pytest.raises(RuntimeError):
        ps.perturb(2, 0.1)
    ps.restore()


def test_host_master_and_memory_figures():
    model = _model(torch.bfloat16)
    ps = ParameterSet(model, master_device="cpu")
    n = sum(p.numel() for p in model.parameters())
    assert ps.master_bytes == 4 * n and ps.working_bytes == 2 * n
    assert all(m.device.type == "cpu" for m in ps.master)


def test_non_float_parameters_are_refused():
    with pytest.raises(TypeError):
        ParameterSet([torch.zeros(3, dtype=torch.long)])


def test_noise_into_matches_noise_like():
    t = torch.empty(7, 3)
    buf = torch.empty(2, 7, 3)
    from esnb.noise import noise_into

    noise_into(buf[1], 9, 4)
    assert torch.equal(buf[1], noise_like(t, 9, 4))


def test_memory_of_perturb_and_update_does_not_grow_with_population():
    from esnb.analysis import TensorMemory
    from esnb.es import ES, ESConfig

    model = _model()
    largest = max(p.numel() for p in model.parameters()) * 4
    ps = ParameterSet(model)
    with TensorMemory() as mem:
        with ps.perturbed(1, 0.1):
            pass
    assert mem.peak == largest  # one float32 noise tensor at a time
    peaks = []
    for n in (2, 16):
        es = ES(model, ESConfig(population_size=n))
        with torch.no_grad(), TensorMemory() as mem:
            es.apply_update(list(range(n)), [1] * n, [0.5] * n)
        peaks.append(mem.peak)
    assert peaks[0] == peaks[1] <= 8 * largest


def test_weight_shift_table():
    from esnb.analysis import shift_table, snapshot, weight_shifts

    model = _model()
    before = snapshot(model)
    with torch.no_grad():
        model[0].bias.add_(1.0)
    shifts = weight_shifts(before, model)
    assert abs(float(shifts["0.bias"].abs().min()) - 1.0) < 1e-6 and float(shifts["0.weight"].abs().max()) == 0.0
    table = shift_table(before, model).set_index("tensor")
    assert table.loc["0.bias", "changed"] == 1.0 and table.loc["2.weight", "changed"] == 0.0
