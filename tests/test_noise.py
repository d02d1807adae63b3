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


# ---------------------------------------------------------------- the shared noise table


def test_noise_table_windows():
    from esnb.noise import NoiseTable

    table = NoiseTable(1000, seed=3)
    assert table.nbytes == 4000
    assert torch.equal(table.table, NoiseTable(1000, seed=3).table)   # a pure function of (size, seed)
    out = table.noise_like(torch.empty(4, 5), seed=7, index=2)
    start = table.offset(7, 2, 20)
    assert start == stream_seed(7, 2) % 981
    assert torch.equal(out.reshape(-1), table.table[start:start + 20])
    assert not torch.equal(out, table.noise_like(torch.empty(4, 5), seed=8, index=2))
    big = table.noise_into(torch.empty(2500), seed=1, index=0)      # larger than the table: wraps
    assert torch.equal(big[:1000], big[1000:2000]) and torch.equal(big[:1000], table.table)
    with pytest.raises(ValueError, match="size"):
        NoiseTable(0)


def test_table_noise_source_perturbs_with_table_windows_and_restores_exactly():
    from esnb.noise import shared_table

    model = _model()
    snap = _snapshot(model)
    ps = ParameterSet(model, noise="table")
    with ps.perturbed(seed=11, sigma=0.1):
        for i, (p, m) in enumerate(zip(model.parameters(), snap)):
            eps = shared_table().noise_like(m, 11, i)
            assert torch.equal(p, eps.mul(0.1).add(m))
            assert torch.equal(noise_like(m, 11, i, source="table"), eps)
    assert _same_bits(model, snap)
    with pytest.raises(ValueError, match="noise"):
        ParameterSet(model, noise="tabel")


def test_noise_table_run_replays_bit_exactly_from_its_seed_log(tmp_path, one_cpu_thread):
    import json

    from esnb.finetune import FinetuneConfig, finetune, rebuild
    from esnb.models import load_model
    from esnb.tasks import countdown as cd, get_task

    model, tok = load_model("tiny", device="cpu")
    train, test = cd.load_split()
    cfg = FinetuneConfig.of(population_size=6, sigma=0.05, alpha=0.01, iterations=2, train_size=6, test_size=2,
                         max_new_tokens=40, eval_every=0, checkpoint_every=0, noise="table", save_final=False)
    result = finetune(model, tok, get_task("countdown", prompt_style="compact"), train, test, cfg,
                      output_dir=tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["noise"] == "table"
    assert all(e["reward_max"] > e["reward_min"] for e in result.log_rows)  # real updates, not all-tie skips
    trained = [p.detach().clone() for p in result.model.parameters()]
    fresh, _ = load_model("tiny", device="cpu")
    rebuild(tmp_path / "run", fresh)
    assert all(torch.equal(a, b) for a, b in zip(trained, fresh.parameters()))
    # and the table changed the result: the same run with independent noise ends elsewhere
    other, _ = load_model("tiny", device="cpu")
    cfg = FinetuneConfig.of(**{**cfg.flat(), "noise": "independent"})
    finetune(other, tok, get_task("countdown", prompt_style="compact"), train, test, cfg, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(trained, other.parameters()))


def _run_es(model, workers, cache, precision="master", optimizer="sgd", antithetic=False, iterations=3):
    from esnb.es import ES, ESConfig

    cfg = ESConfig(population_size=6, sigma=0.05, alpha=0.01, seed=3, precision=precision, optimizer=optimizer,
                   antithetic=antithetic)
    es = ES(model, cfg, noise_cache=cache)
    es.params.workers = workers
    norms, rewards = [], []
    x = torch.linspace(-1, 1, 16).to(next(model.parameters()).dtype)
    for _ in range(iterations):
        r = []
        for m in es.ask():
            with es.perturbed(m), torch.no_grad():
                r.append(float(model(x).sum()))
        rewards.append(r)
        norms.append(es.tell(r)["update_norm"])
    return norms, rewards, _snapshot(model), es


@pytest.mark.parametrize("precision,dtype,optimizer,antithetic", [
    ("master", torch.float32, "sgd", False), ("master", torch.bfloat16, "adam", True),
    ("paper", torch.bfloat16, "sgd", False)])
def test_threads_and_noise_cache_change_no_bit(precision, dtype, optimizer, antithetic):
    # workers and the cache are about time only: rewards, logged norms and weights stay bit-identical
    base = _run_es(_model(dtype), 1, 0, precision, optimizer, antithetic)
    for workers, cache in ((3, 0), (1, 10**8), (2, 10**8), (2, 3 * 4 * 6000)):  # the last: room for a few members
        norms, rewards, snap, es = _run_es(_model(dtype), workers, cache, precision, optimizer, antithetic)
        assert rewards == base[1] and norms == base[0]
        assert all(torch.equal(a, b) for a, b in zip(snap, base[2]))
        assert es.params.noise_cache_bytes <= cache


def test_noise_cache_keeps_memory_for_reuse_and_stays_in_budget():
    model = _model()
    ps = ParameterSet(model)
    one = ps.master_bytes_total
    assert ps.cache_noise(2 * one + 1) == 2 * one + 1
    for seed in (1, 2, 3):  # the third member finds no room and is drawn as without a cache
        with ps.perturbed(seed, 0.1):
            pass
    assert ps.noise_cache_bytes == 2 * one and set(ps._cache) == {1, 2}
    assert torch.equal(ps.eps(2, 1), noise_like(ps.master[1], 2, 1))
    ps.clear_noise_cache()  # a new iteration: the slots are reused, not allocated again
    with ps.perturbed(9, 0.1):
        pass
    assert ps.noise_cache_bytes == 2 * one and set(ps._cache) == {9}
    assert ps.cache_noise(0) == 0 and ps.noise_cache_bytes == 0
    with pytest.raises(ValueError, match="noise cache"):
        ps.cache_noise(-1)
    assert ParameterSet(model).cache_noise("auto") == 0  # small models: drawing is cheap, no cache


def test_cpu_share_measures_other_processes_and_caps_threads(monkeypatch):
    import esnb._cpu as cpu

    # samples (wall, CPU seconds of all processes, our own): over 2 s all processes ran 3.8 s
    # of CPU and we ran 1.9 s of it, so the others used 0.95 cores: one core is theirs
    samples = iter([(100.0, 50.0, 10.0), (102.0, 53.8, 11.9)])
    monkeypatch.setattr(cpu, "_sample", lambda: next(samples))
    monkeypatch.setattr(cpu, "_last", (99.0, 49.0, 9.0))
    assert cpu.others_load() == 0.0  # 1 s since the last look: all of it was ours
    assert abs(cpu.others_load() - 0.95) < 1e-9
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(cpu, "others_load", lambda: 0.95)
    assert cpu.free_cores() == 1
    monkeypatch.setattr(cpu, "others_load", lambda: 0.3)  # a browser idling: not a core
    assert cpu.free_cores() == 2
    # what the threads become
    old = torch.get_num_threads()
    monkeypatch.setattr(cpu, "free_cores", lambda: 1)
    with cpu.share_cores() as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == old
    monkeypatch.setattr(cpu, "free_cores", lambda: 64)
    with cpu.share_cores(cap=1) as n:  # never more than the ceiling
        assert n == 1


def test_adapt_threads_rechecks_the_cores_before_every_notebook_cell(monkeypatch):
    import esnb
    import esnb._cpu as cpu
    from IPython.core.interactiveshell import InteractiveShell

    old = torch.get_num_threads()
    shell = InteractiveShell.instance()
    try:
        free = [2]
        monkeypatch.setattr(cpu, "free_cores", lambda: free[0])
        assert esnb.adapt_threads(2) == 2
        free[0] = 1                       # another process took a core: the next cell runs on one thread
        shell.run_cell("import torch; seen = torch.get_num_threads()")
        assert shell.user_ns["seen"] == 1
        free[0] = 64                      # idle again: back to the ceiling, never above it
        shell.run_cell("seen = torch.get_num_threads()")
        assert shell.user_ns["seen"] == 2
        esnb.adapt_threads(1)             # a second call replaces the first hook
        shell.run_cell("seen = torch.get_num_threads()")
        assert shell.user_ns["seen"] == 1
        assert sum(cb is cpu._cell_hook for cb in shell.events.callbacks["pre_run_cell"]) == 1
        with pytest.raises(ValueError, match="cap"):
            esnb.adapt_threads(0)
    finally:
        shell.events.unregister("pre_run_cell", cpu._cell_hook)
        cpu._cell_hook = None
        InteractiveShell.clear_instance()
        torch.set_num_threads(old)
