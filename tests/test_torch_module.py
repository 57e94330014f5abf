"""fastlstm.torch.LSTM against torch.nn.LSTM (the oracle): outputs and every gradient with
the same weights, packed sequences, several forwards before one backward, the binding of
the parameters through torch's module operations, torch.compile, opcheck, gradcheck, and
bad input."""
import copy
import io
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastlstm.torch")
openmp = pytest.importorskip("fastlstm._openmp")
nn = torch.nn
pack = torch.nn.utils.rnn

pytestmark = pytest.mark.torch

CONFIGS = {
    "L1": dict(),
    "L2-bi": dict(num_layers=2, bidirectional=True),
    "L2-proj-bf": dict(num_layers=2, proj_size=3, batch_first=True),
    "L1-nobias-bi-proj": dict(bias=False, bidirectional=True, proj_size=2),
}


def pair(cfg, dtype=torch.float64, I=3, H=5, seed=0):
    torch.manual_seed(seed)
    ref = nn.LSTM(I, H, dtype=dtype, **cfg)
    return ref, ft.LSTM.from_torch(ref)


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_nn_lstm(name, with_state, dtype):
    cfg = CONFIGS[name]
    ref, m = pair(cfg, dtype)
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    T, B = 6, 4
    shape = (B, T, 3) if cfg.get("batch_first") else (T, B, 3)
    x = torch.randn(shape, dtype=dtype)
    LD = ref.num_layers * (2 if ref.bidirectional else 1)
    P = ref.proj_size or ref.hidden_size
    hx = (torch.randn(LD, B, P, dtype=dtype), torch.randn(LD, B, 5, dtype=dtype))
    outs = []
    for mod in (ref, m):
        xi = x.clone().requires_grad_(True)
        hi = tuple(t.clone().requires_grad_(True) for t in hx) if with_state else None
        y, (h, c) = mod(xi, hi)
        (y.pow(2).sum() + 3 * h.sum() + c.sin().sum()).backward()
        outs.append((y, h, c, xi.grad, hi and hi[0].grad, hi and hi[1].grad, grads(mod)))
    for a, b in zip(outs[1][:6], outs[0][:6]):
        if b is not None:
            close(a.detach(), b.detach(), tol)
    for k in outs[0][6]:
        close(outs[1][6][k], outs[0][6][k], tol)


@pytest.mark.parametrize("used", ["y", "h", "c", "hc"])
def test_a_loss_on_some_outputs_only(used):
    # the outputs the loss leaves out reach the backward as None, not zeros
    ref, m = pair(CONFIGS["L2-bi"])
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    hx = (torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64))
    outs = []
    for mod in (ref, m):
        xi = x.clone().requires_grad_(True)
        hi = tuple(t.clone().requires_grad_(True) for t in hx)
        y, (h, c) = mod(xi, hi)
        parts = {"y": y.pow(2).sum(), "h": (2 * h).sum(), "c": c.sin().sum()}
        sum(parts[k] for k in used).backward()
        outs.append((xi.grad, hi[0].grad, hi[1].grad, grads(mod)))
    for a, b in zip(outs[1][:3], outs[0][:3]):
        close(a, b, 1e-10)
    for k in outs[0][3]:
        close(outs[1][3][k], outs[0][3][k], 1e-10)


@pytest.mark.parametrize("name", ["L1", "L2-bi"])
def test_packed_sequence_in_packed_sequence_out(name):
    ref, m = pair(CONFIGS[name])
    lengths = torch.tensor([3, 7, 1, 5])
    xs = [torch.randn(n, 3, dtype=torch.float64) for n in lengths]
    outs = []
    for mod in (ref, m):
        seqs = [s.clone().requires_grad_(True) for s in xs]
        packed = pack.pack_sequence(seqs, enforce_sorted=False)
        y, (h, c) = mod(packed)
        assert isinstance(y, pack.PackedSequence)
        (y.data.pow(2).sum() + h.sum() + c.sum()).backward()
        outs.append((y, h, c, [s.grad for s in seqs], grads(mod)))
    (yr, hr, cr, gr, pr), (y, h, c, g, p) = outs
    assert torch.equal(y.batch_sizes, yr.batch_sizes)
    assert torch.equal(y.sorted_indices, yr.sorted_indices)
    close(y.data.detach(), yr.data.detach(), 1e-10)
    close(h.detach(), hr.detach(), 1e-10)
    close(c.detach(), cr.detach(), 1e-10)
    for a, b in zip(g, gr):
        close(a, b, 1e-10)
    for k in pr:
        close(p[k], pr[k], 1e-10)


def test_unbatched_input():
    ref, m = pair(CONFIGS["L2-bi"])
    x = torch.randn(6, 3, dtype=torch.float64)
    (y, (h, c)), (yr, (hr, cr)) = m(x), ref(x)
    assert y.shape == yr.shape and h.shape == hr.shape == c.shape
    for a, b in ((y, yr), (h, hr), (c, cr)):
        close(a.detach(), b.detach(), 1e-10)


def test_several_forwards_before_one_backward():
    ref, m = pair(CONFIGS["L2-bi"])
    a, b = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(8, 3, 3, dtype=torch.float64)
    for mod in (ref, m):
        ya, _ = mod(a)
        yb, _ = mod(b)                 # a second forward before either backward
        yc, _ = mod(a * 0.5)
        (ya.sum() + 2 * yb.pow(2).sum() - yc.sum()).backward()
    gr, gm = grads(ref), grads(m)
    for k in gr:
        close(gm[k], gr[k], 1e-10)


def test_retain_graph_backward_twice_and_gradient_accumulation():
    ref, m = pair(CONFIGS["L1"])
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    for mod in (ref, m):
        y, _ = mod(x)
        y.sum().backward(retain_graph=True)
        y.pow(2).sum().backward()
        mod(x)[0].mean().backward()            # accumulates into .grad
    gr, gm = grads(ref), grads(m)
    for k in gr:
        close(gm[k], gr[k], 1e-10)


def test_no_grad_keeps_nothing_and_needs_input_grad():
    _, m = pair(CONFIGS["L1"])
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
    assert not y.requires_grad and not any(e.busy for e in m._engines)
    with torch.inference_mode():
        m(x)
    out = m(x)                        # parameters require grad: kept
    assert out[0].requires_grad and sum(e.busy for e in m._engines) == 1
    del out
    assert not any(e.busy for e in m._engines), "a freed graph gives its engine back"


def test_double_backward_raises():
    _, m = pair(CONFIGS["L1"])
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


def test_binding_survives_module_operations(tmp_path):
    ref, m = pair(CONFIGS["L2-bi"])
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for mod, o in ((m, opt), (ref, ropt)):             # an optimizer's in-place update
        mod(x)[0].sum().backward()
        o.step()
    close(m(x)[0].detach(), ref(x)[0].detach(), 1e-10)
    m2 = copy.deepcopy(m)
    close(m2(x)[0].detach(), ref(x)[0].detach(), 1e-10)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    close(m3(x)[0].detach(), ref(x)[0].detach(), 1e-10)
    m.float()
    close(m(x.float())[0].detach().double(), ref(x)[0].detach(), 5e-5)
    m.double()
    ref2 = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    m.load_state_dict(ref2.state_dict())
    close(m(x)[0].detach(), ref2(x)[0].detach(), 1e-10)
    m.load_state_dict(ref.state_dict(), assign=True)
    close(m(x)[0].detach(), ref(x)[0].detach(), 1e-10)
    ref.load_state_dict(m.state_dict())                 # and back into nn.LSTM
    assert m.to_torch().state_dict().keys() == ref.state_dict().keys()


def test_dropout_and_variants_follow_train_and_eval():
    torch.manual_seed(0)
    m = ft.LSTM(3, 5, num_layers=2, dropout=0.5, zoneout=0.2, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    m.eval()
    a, b = m(x)[0], m(x)[0]
    assert torch.equal(a, b)
    m.train()
    assert not torch.equal(m(x)[0], a)


def test_torch_compile_fullgraph_matches_eager():
    _, m = pair(CONFIGS["L2-bi"])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = m, nn.Linear(10, 1, dtype=torch.float64)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.head(y[-1])

    net = Net()
    compiled = torch.compile(net, fullgraph=True)          # inductor, the default
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    want = net(x)
    want.sum().backward()
    g_eager = grads(net)
    net.zero_grad()
    got = compiled(x)
    got.sum().backward()
    close(got.detach(), want.detach(), 1e-12)
    for k, v in grads(net).items():
        close(v, g_eager[k], 1e-12)
    # an input that needs a gradient gets it (above, data: none was made)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    net(xs[0]).sum().backward()
    compiled(xs[1]).sum().backward()
    close(xs[1].grad, xs[0].grad, 1e-12)


def test_opcheck_and_gradcheck():
    _, m = pair(CONFIGS["L1-nobias-bi-proj"], H=4)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    weights = list(m._parameters.values())
    torch.library.opcheck(torch.ops.fastlstm.lstm.default,
                          (x, None, None, None, weights, m._key, False, True))
    m.eval()

    def f(x, h0, *ws):
        y, (h, c) = m(x, (h0, torch.zeros_like(h0[..., :1]).expand(2, 2, 4).contiguous()))
        return y, h, c
    h0 = torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, h0, *weights))


def test_convert_replaces_every_nn_lstm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ModuleDict(
        {"enc": nn.LSTM(3, 4, batch_first=True), "dec": nn.LSTM(4, 2)})).double()
    converted = ft.convert(model)
    assert type(converted[1]["enc"]) is ft.LSTM and type(converted[1]["dec"]) is ft.LSTM
    assert type(model[1]["enc"]) is nn.LSTM                  # not in place by default
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    for mod in (model, converted):
        h = mod[0](x)
        y, _ = mod[1]["enc"](h)
        z, _ = mod[1]["dec"](y)
        mod.out = z
    close(converted.out.detach(), model.out.detach(), 1e-10)

    class MyLSTM(nn.LSTM):
        pass
    with pytest.warns(UserWarning, match="subclass"):
        left = ft.convert(nn.Sequential(MyLSTM(2, 2)))
    assert type(left[0]) is MyLSTM
    with pytest.warns(UserWarning, match="float16"):
        ft.convert(nn.Sequential(nn.LSTM(2, 2).half()))
    assert type(ft.convert(nn.LSTM(2, 3))) is ft.LSTM


@pytest.mark.parametrize("case", ["half", "bfloat16", "meta", "feature", "rank", "hx_shape",
                                  "hx_type", "dtype_mix"])
def test_bad_input_is_refused_clearly_and_changes_nothing(case):
    _, m = pair(CONFIGS["L2-bi"])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    bad = {
        "half": ((x.half(),), TypeError, "float32 or float64"),
        "bfloat16": ((x.bfloat16(),), TypeError, "float32 or float64"),
        "meta": ((x.to("meta"),), RuntimeError, "runs on the CPU"),
        "feature": ((torch.randn(5, 2, 4, dtype=torch.float64),), RuntimeError,
                    "Expected 3, got 4"),
        "rank": ((torch.randn(5, 2, 3, 1, dtype=torch.float64),), RuntimeError, "2D or 3D"),
        "hx_shape": ((x, (torch.zeros(4, 3, 5, dtype=torch.float64),
                          torch.zeros(4, 2, 5, dtype=torch.float64))), RuntimeError,
                     r"Expected hx\[0\] \(h_0\) size \(4, 2, 5\)"),
        "hx_type": ((x, torch.zeros(4, 2, 5)), TypeError, "tuple"),
        "dtype_mix": ((x.float(),), RuntimeError, "module's dtype torch.float64"),
    }
    args, exc, msg = bad[case]
    with pytest.raises(exc, match=msg):
        m(*args)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="CPU"):
        ft.LSTM(3, 4, device="meta")
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        ft.LSTM(3, 4, dtype=torch.float16)


def test_import_fastlstm_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, fastlstm; "
                          "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_threads_follow_torch():
    _, m = pair(CONFIGS["L1"])
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        m(x)[0].sum().backward()
        assert all(e.lstm.threads == 1 for e in m._engines)
    finally:
        torch.set_num_threads(n)
    assert np.isfinite(m.weight_ih_l0.grad.numpy()).all()


def _lending():
    """Whether this process's torch lends its OpenMP workers (see fastlstm.torch._OpenMP):
    whatever torch's own thread count (the suite's torch fixture sets 1), a region of two
    threads makes its worker. The pinned CPU build (torch 2.13.0, what CI installs) loads
    libgomp, so these tests run there; a build on another OpenMP runtime has no pool to
    lend, and its split calls run on fastlstm's own servers, which the tests of
    tests/test_threads.py and the lent-or-not equality tests here cover."""
    openmp.lend(1, lambda: None)
    return openmp._pool.lib is not None


def test_a_split_call_runs_its_parts_on_torchs_openmp_workers():
    """A job posted to a server inside a lent region runs on one of torch's OpenMP
    workers, not on the server's own thread; the region returns the work's value, raises
    its error, and leaves the servers free either way."""
    if not _lending():
        pytest.skip("torch without libgomp")
    import threading

    from fastlstm import _servers
    from fastlstm._spin import FORWARD
    ran = []

    def work():
        server = _servers.take_servers(1)[0]
        try:
            number = _servers.new_job()

            def job(cell, spins):
                ran.append(threading.get_native_id())
                cell[_servers.DONE] = cell[_servers.SEQ]
            server.wait(server.post(number, job, FORWARD))
            return server._thread.native_id
        finally:
            _servers.release_servers()
    own = openmp.lend(2, work)
    assert ran and ran[0] not in (own, threading.get_native_id())
    server = _servers._state.servers[0]          # holds no job once the region ends
    assert server._job is None and server._kept() is None
    with pytest.raises(ZeroDivisionError):
        openmp.lend(2, lambda: 1 / 0)
    assert _servers._state.servers_owner is None
    assert openmp.lend(2, lambda: 7) == 7


def test_a_call_handed_to_a_lent_server_runs_once():
    """run_pair inside a lent region hands its second call to the hosted server, which
    runs it once: the next region's thread, entering the job it ran last, does not run
    it again."""
    if not _lending():
        pytest.skip("torch without libgomp")
    import threading

    from fastlstm import _servers, _threads
    calls = []

    def pair():
        _threads.run_pair(lambda: None, lambda: calls.append(threading.get_native_id()))
    for _ in range(3):
        openmp.lend(2, pair)
    assert len(calls) == 3 and threading.get_native_id() not in calls
    # entered again when its command is done (or another job's is pending): nothing runs
    server = _servers.take_servers(1)[0]
    try:
        posted = _servers._Posted(server, lambda: calls.append(0))
        posted.result()
        posted._run(server.cell.copy(), 0)           # its command done
        other = server.cell.copy()                   # another job's command pending
        other[_servers.SEQ] += 1
        other[_servers.JOB] = _servers.new_job()
        posted._run(other, 0)
    finally:
        _servers.release_servers()
    assert calls.count(0) == 1


@pytest.mark.parametrize("cfg", [dict(), dict(num_layers=2, bidirectional=True)],
                         ids=["plan", "L2-bi-packed"])
def test_lent_and_unlent_calls_agree_bitwise(monkeypatch, cfg):
    """A training step split over two threads gives bitwise the same output and
    gradients whether its other part (or direction) runs on torch's OpenMP worker or on
    fastlstm's own threads, from the main thread and from another thread: a one-layer
    call (a split plan) and a two-layer bidirectional one on a PackedSequence."""
    import threading
    torch.manual_seed(0)
    ref = nn.LSTM(32, 64, dtype=torch.float32, **cfg)
    x = torch.randn(50, 32, 32)
    if cfg:
        x = pack.pack_padded_sequence(x, torch.randint(10, 51, (32,)), enforce_sorted=False)

    def step():
        m = ft.LSTM.from_torch(ref, threads=2)
        out = m(x)[0]
        out = out.data if cfg else out
        out.square().sum().backward()
        return out.detach().clone(), grads(m)
    lent = step()
    box = []
    t = threading.Thread(target=lambda: box.append(step()))
    t.start()
    t.join()
    monkeypatch.setattr(openmp._pool, "lib", None)         # fastlstm's own servers only
    own = step()
    for other in (own, box[0]):
        assert torch.equal(lent[0], other[0])
        assert all(torch.equal(lent[1][k], other[1][k]) for k in lent[1])


DDP_SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
import fastlstm.torch as ft


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = ft.convert(torch.nn.LSTM(3, 5, num_layers=2, bidirectional=True,
                                             batch_first=True, dtype=torch.float64))
        self.head = torch.nn.Linear(10, 1, dtype=torch.float64)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def data(s):
    g = torch.Generator().manual_seed(s)
    return (torch.randn(8, 6, 3, generator=g, dtype=torch.float64),
            torch.randn(8, 1, generator=g, dtype=torch.float64))


rank, size, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
net = Net()
if size > 1:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[4])
    dist.init_process_group("gloo", rank=rank, world_size=size)
    model = torch.nn.parallel.DistributedDataParallel(net)
else:
    model = net
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for s in range(3):
    x, y = data(s)
    h = len(x) // size                       # this rank's share of the global batch
    opt.zero_grad()
    loss = ((model(x[rank * h:(rank + 1) * h]) - y[rank * h:(rank + 1) * h]) ** 2).mean()
    loss.backward()                          # DDP averages the gradients over the ranks
    opt.step()
if size > 1:
    dist.destroy_process_group()
if rank == 0:
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, out)
"""


def test_ddp_over_gloo_matches_one_process_on_the_global_batch(tmp_path):
    """2 processes (gloo, loopback) train as one process on the global batch: the
    parameters after 3 SGD steps agree to 1e-10 (float64)."""
    import socket
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    one = subprocess.run([sys.executable, str(script), "0", "1", str(tmp_path / "one.pt")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2",
                               str(tmp_path / "ddp.pt"), port],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    want, got = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "ddp.pt")
    assert want.keys() == got.keys()
    for k in want:
        close(got[k], want[k], 1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)],
                         ids=["float64", "float32"])
def test_a_real_model_trains_the_same_after_convert(dtype, tol):
    """examples/torch_digits.py: Embedding -> 2-layer bidirectional LSTM -> Linear on
    scikit-learn's digits, AdamW, 30 steps, once with nn.LSTM and once converted from the
    same weights: the loss curves agree at every step."""
    pytest.importorskip("sklearn")
    import pathlib
    import runpy
    example = runpy.run_path(str(pathlib.Path(__file__).parent.parent / "examples"
                                 / "torch_digits.py"))
    want, got, _, _ = example["run"](dtype, steps=30)
    assert want[-1] < 0.8 * want[0]                          # it learns
    assert np.max(np.abs(got - want) / np.abs(want)) <= tol


@pytest.mark.parametrize("num_layers", [1, 2])
def test_a_column_split_training_step_matches_nn_lstm(num_layers):
    """A layer large for its batch trains split by hidden units (fastlstm._columns_train),
    on torch's OpenMP workers where they are lent: the gradients are nn.LSTM's."""
    from fastlstm._plans import ColumnTrainPlan
    from fastlstm._threads import usable_cores
    threads = torch.get_num_threads()
    torch.set_num_threads(2)        # the module's default: torch's (another test sets 1)
    try:
        ref, m = pair(dict(num_layers=num_layers), torch.float64, I=6, H=256, seed=2)
        x = torch.randn(5, 2, 6, dtype=torch.float64)
        outs = []
        for mod in (ref, m):
            for _ in range(2):              # the second call takes the plan; grads add up
                xi = x.clone().requires_grad_(True)
                y, (h, c) = mod(xi)
                (y.pow(2).sum() + h.sum()).backward()
            outs.append((y.detach(), xi.grad, grads(mod)))
    finally:
        torch.set_num_threads(threads)
    engines = [e for e in m._engines if e is not None]
    if usable_cores() > 1:
        assert any(type(e.lstm._last) is ColumnTrainPlan for e in engines)
    for a, b in zip(outs[1][:2], outs[0][:2]):
        close(a, b, 1e-10)
    for k in outs[0][2]:
        close(outs[1][2][k], outs[0][2][k], 1e-10)
