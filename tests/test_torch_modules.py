"""cbn.torch's modules against torch.nn.BatchNormNd: forward, gradients, running statistics.

torch.nn's module is the oracle here (it is the contract: a drop-in replacement). Skipped
when torch is missing (``pip install -e ".[torch]"``), except under CI=true, where it fails.
"""
import copy
import subprocess
import sys

import numpy as np
import pytest

from processes import environment, unavailable

try:
    import torch
    import cbn
    import cbn.torch as ct
    from cbn.torch import _functions
except ImportError:
    torch = None


@pytest.fixture(autouse=True, scope="module")
def torch_on_one_thread():
    """PyTorch's own kernels (the oracle) on one thread: on tiny tensors its OpenMP team
    costs tens of milliseconds per call on a loaded 2-core machine."""
    if torch is None:
        unavailable("torch is not installed (pip install -e '.[torch]')")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def channels_last_3d(x):
    return x.contiguous(memory_format=torch.channels_last_3d)


def every_other(x):      # a strided view: every other entry of a twice-as-long last dim
    return torch.repeat_interleave(x, 2, dim=-1)[..., ::2]


LAYOUTS = {   # name: (module, shape, make the input's layout)
    "NCHW": ("BatchNorm2d", (6, 3, 5, 4), lambda x: x),
    "channels_last": ("BatchNorm2d", (6, 3, 5, 4), channels_last),
    "strided": ("BatchNorm2d", (6, 3, 5, 4), every_other),
    "transposed": ("BatchNorm2d", (6, 3, 5, 4), lambda x: x.transpose(2, 3).contiguous()
                   .transpose(2, 3)),
    "1d": ("BatchNorm1d", (10, 4), lambda x: x),
    "1d-T": ("BatchNorm1d", (10, 4), lambda x: x.t().contiguous().t()),
    "1d-length": ("BatchNorm1d", (5, 4, 7), lambda x: x),
    "3d": ("BatchNorm3d", (3, 2, 4, 3, 5), lambda x: x),
    "3d-channels_last": ("BatchNorm3d", (3, 2, 4, 3, 5), channels_last_3d),
}
CONFIGS = {
    "default": {},
    "momentum=None": {"momentum": None},
    "affine=False": {"affine": False},
    "bias=False": {"bias": False},
    "no running stats": {"track_running_stats": False},
    "eps, momentum": {"eps": 1e-3, "momentum": 0.3},
}
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12} if torch else {}


def pair(name, num_features, dtype, **config):
    """torch.nn's module with random parameters and cbn's loaded from its state_dict."""
    theirs = getattr(torch.nn, name)(num_features, dtype=dtype, **config)
    with torch.no_grad():
        for p in theirs.parameters():
            p.uniform_(0.5, 1.5)
    ours = getattr(ct, name)(num_features, dtype=dtype, **config)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_close(got, want, dtype, what):
    tolerance = TOLERANCE[dtype]
    if want is None:
        assert got is None, what
        return
    assert got.dtype == want.dtype and got.shape == want.shape, what
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= tolerance * scale, what


def step(module, x, dy):
    """y and the gradients of x and the parameters, for a fresh leaf copy of x."""
    x = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    y = module(x)
    wanted = [x] + [p for p in (module.weight, module.bias) if p is not None]
    return y, torch.autograd.grad(y, wanted, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] if torch else [],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=list(CONFIGS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_and_eval_match_torch(layout, config, dtype):
    name, shape, arrange = LAYOUTS[layout]
    theirs, ours = pair(name, shape[1], dtype, **CONFIGS[config])
    generator = torch.Generator().manual_seed(0)
    for mode in ("train", "train", "train", "eval"):
        theirs.train(mode == "train")
        ours.train(mode == "train")
        x = arrange(torch.randn(shape, generator=generator, dtype=dtype) * 3 + 2)
        dy = torch.randn(shape, generator=generator, dtype=dtype)
        y_theirs, grads_theirs = step(theirs, x, dy)
        y_ours, grads_ours = step(ours, x, dy)
        assert_close(y_ours, y_theirs, dtype, f"{mode} y")
        for what, got, want in zip(("dx", "dweight", "dbias"), grads_ours, grads_theirs):
            assert_close(got, want, dtype, f"{mode} {what}")
        for buffer in ("running_mean", "running_var"):
            assert_close(getattr(ours, buffer), getattr(theirs, buffer), dtype, buffer)
        assert_close(ours.num_batches_tracked, theirs.num_batches_tracked, dtype, "count")


@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "1d", "1d-length", "3d"])
@pytest.mark.parametrize("mode", ["train", "eval", "train, ReLU fused"])
def test_gradcheck_float64(layout, mode):
    name, shape, arrange = LAYOUTS[layout]
    shape = (4, shape[1]) + tuple(min(s, 3) for s in shape[2:])   # cheap Jacobians
    module = getattr(ct, name)(shape[1], dtype=torch.float64)
    module.fused_relu = mode.endswith("fused")
    torch.manual_seed(0)   # fixed inputs: none at ReLU's kink, whatever the test order
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
    module.train(mode != "eval")
    x = arrange(torch.randn(shape, dtype=torch.float64)).requires_grad_()
    weight = module.weight.detach().clone().requires_grad_()
    bias = module.bias.detach().clone().requires_grad_()

    def function(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(function, (x, weight, bias))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_in_float32(dtype):
    dtype = getattr(torch, dtype)
    theirs, ours = pair("BatchNorm2d", 3, torch.float32)
    x = channels_last(torch.randn(8, 3, 6, 5) * 2 + 1).to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    y_ours, grads_ours = step(ours, x, dy)
    y_want, grads_want = step(theirs, x.float(), dy.float())   # float32, then rounded
    assert y_ours.dtype == dtype and grads_ours[0].dtype == dtype
    assert grads_ours[1].dtype == torch.float32
    rounding = torch.finfo(dtype).eps
    assert (y_ours.float() - y_want.to(dtype).float()).abs().max() <= 4 * rounding * 4
    assert (grads_ours[0].float() - grads_want[0]).abs().max() <= 4 * rounding * 4
    assert torch.allclose(grads_ours[1], grads_want[1], rtol=1e-2, atol=1e-2)
    assert torch.allclose(ours.running_var, theirs.running_var, rtol=1e-2)


@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "strided", "3d-channels_last"])
def test_kernels_work_on_the_tensors_own_memory(layout):
    name, shape, arrange = LAYOUTS[layout]
    x = arrange(torch.randn(shape))
    view = _functions.array(x)
    assert view.ctypes.data == x.data_ptr()                         # a view, not a copy
    assert view.strides == tuple(s * x.element_size() for s in x.stride())
    y = getattr(ct, name)(shape[1])(x)
    if layout != "strided":                                         # dense: output in x's format
        assert y.stride() == x.stride()


@pytest.mark.parametrize("frozen", ["x", "parameters"])
def test_gradients_of_only_some_inputs(frozen):
    theirs, ours = pair("BatchNorm2d", 3, torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    dy = torch.randn(x.shape, dtype=torch.float64)
    for module in (theirs, ours):
        module.requires_grad_(frozen != "parameters")
    results = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_(frozen != "x")
        wanted = [leaf] if frozen == "parameters" else [module.weight, module.bias]
        results.append(torch.autograd.grad(module(leaf), wanted, dy))
    for got, want in zip(results[1], results[0]):
        assert_close(got, want, torch.float64, frozen)


def test_sum_backward_with_expanded_gradient():
    theirs, ours = pair("BatchNorm2d", 3, torch.float64)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) + 3
    for module in (theirs, ours):
        (module(x) * torch.arange(3.0, dtype=torch.float64).view(1, 3, 1, 1)).sum().backward()
    assert_close(ours.weight.grad, theirs.weight.grad, torch.float64, "dweight")
    assert_close(ours.bias.grad, theirs.bias.grad, torch.float64, "dbias")


def test_state_dict_loads_either_way():
    theirs, ours = pair("BatchNorm2d", 5, torch.float32)
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == [
        "weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    ours(torch.randn(4, 5, 3, 3))
    fresh = torch.nn.BatchNorm2d(5)
    fresh.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert repr(ours) == repr(theirs)


def test_empty_batch_like_torch():
    theirs, ours = pair("BatchNorm2d", 3, torch.float32)
    for module in (theirs, ours):
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = module(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
        assert torch.equal(module.weight.grad, torch.zeros(3))
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("name, x, error, match", [
    ("BatchNorm2d", lambda: torch.randn(2, 3, 4), ValueError, "expected 4D input"),
    ("BatchNorm1d", lambda: torch.randn(2, 3, 4, 5), ValueError, "expected 2D or 3D"),
    ("BatchNorm2d", lambda: torch.randn(2, 4, 3, 3), ValueError, "expected 3 channels"),
    ("BatchNorm2d", lambda: torch.ones(2, 3, 2, 2, dtype=torch.int64), TypeError, "int64"),
    ("BatchNorm2d", lambda: torch.randn(1, 3, 1, 1), ValueError, "more than 1 value"),
    ("BatchNorm1d", lambda: torch.randn(1, 3), ValueError, "more than 1 value"),
    ("BatchNorm2d", lambda: [[1.0]], TypeError, "torch.Tensor"),
])
def test_bad_input(name, x, error, match):
    with pytest.raises(error, match=match):
        getattr(ct, name)(3)(x())


def test_the_checks_made_once_per_call_and_misaligned_tensors(monkeypatch):
    """The module checks its eps and parameters as the core API checks epsilon and gamma
    (once per call, not per kernel); a tensor made by torch.from_numpy on misaligned memory
    (x, or the gradient) reaches the kernels as an aligned copy, with the same results."""
    for name in ("_forward_checked", "backward_checked"):
        def aligned_only(*args, checked=getattr(_functions, name)):
            assert all(a.flags.aligned for a in args if isinstance(a, np.ndarray))
            return checked(*args)
        monkeypatch.setattr(_functions, name, aligned_only)
    x = torch.randn(4, 3, 2, 2)
    module = ct.BatchNorm2d(3)
    module.eps = -1.0
    with pytest.raises(ValueError, match="epsilon"):
        module(x)
    module.eps = 1e-5
    module.weight = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="weight has shape"):
        module(x)

    def misaligned(t):
        raw = np.zeros(t.numel() * t.element_size() + 1, np.uint8)
        view = torch.from_numpy(raw[1:].view(np.float32).reshape(t.shape))
        assert view.data_ptr() % t.element_size()
        return view.copy_(t)

    dy = torch.randn(4, 3, 2, 2)
    theirs, ours = pair("BatchNorm2d", 3, torch.float32)
    want = step(theirs, x, dy)
    x = misaligned(x).requires_grad_()
    y = ours(x)
    got = y, torch.autograd.grad(y, [x, ours.weight, ours.bias], misaligned(dy))
    for i, (g, w) in enumerate(zip([got[0], *got[1]], [want[0], *want[1]])):
        assert_close(g, w, torch.float32, f"output {i}")


@pytest.mark.parametrize("layout", ["NCHW", "channels_last", "strided", "transposed", "1d-T",
                                    "3d-channels_last"])
def test_the_module_gives_the_core_apis_bits(layout):
    """The layer reaches the kernels through the core's entries for checked arguments: the
    same bits as cbn.batch_norm_forward and batch_norm_backward on the same memory."""
    name, shape, arrange = LAYOUTS[layout]
    _, ours = pair(name, shape[1], torch.float32)
    generator = torch.Generator().manual_seed(3)
    x, dy = (arrange(torch.randn(shape, generator=generator)) + 2 for _ in range(2))
    x.requires_grad_()
    y = ours(x)
    got = [y] + list(torch.autograd.grad(y, [x, ours.weight, ours.bias], dy))
    w, b = ours.weight.detach().numpy(), ours.bias.detach().numpy()
    want_y, mean, var = cbn.batch_norm_forward(x.detach().numpy(), w, b, axis=1,
                                               epsilon=ours.eps)
    want = [want_y] + list(cbn.batch_norm_backward(dy.numpy(), x.detach().numpy(), mean, var,
                                                   w, axis=1, epsilon=ours.eps))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.detach().numpy().tobytes() == w.astype(np.float32).tobytes(), f"output {i}"


def test_convert_swaps_every_batch_norm_keeping_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6),
                            torch.nn.BatchNorm1d(6, momentum=None)))
    x = torch.randn(5, 2, 6, 6)
    model(x)                                          # running statistics move
    model.eval()
    want = model(x)
    parameters = list(model.parameters())
    converted = ct.convert(model)
    assert converted is model and list(model.parameters()) == parameters  # the same objects
    assert type(model[1]) is ct.BatchNorm2d and type(model[3][2]) is ct.BatchNorm1d
    assert model[3][2].momentum is None and not model[1].training
    assert torch.allclose(model(x), want, atol=1e-6)
    assert ct.convert(model) is model and type(model[1]) is ct.BatchNorm2d   # idempotent
    weight = model[1].weight
    ct.convert(model, sync=True)                      # cbn's local modules become synchronized
    assert type(model[1]) is ct.SyncBatchNorm and model[1].weight is weight
    synchronized = ct.convert(torch.nn.Sequential(torch.nn.BatchNorm3d(2)), sync=True)
    assert type(synchronized[0]) is ct.SyncBatchNorm
    assert type(ct.convert(torch.nn.SyncBatchNorm(2))) is ct.SyncBatchNorm
    assert type(ct.convert(torch.nn.BatchNorm2d(2))) is ct.BatchNorm2d


@pytest.mark.parametrize("sync", [False, True], ids=["local", "sync"])
def test_convert_keeps_what_is_attached_to_each_module(sync):
    """The module objects stay (only their class changes): hooks and their handles, the
    training flag, the parameters (an optimizer built before trains them, requires_grad
    as set), dtype, state_dict hooks, and a module used twice stays one module."""
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1, dtype=torch.float64), norm, norm)
    norm.eval()                                        # the model's other modules train
    norm.bias.requires_grad_(False)
    theirs = copy.deepcopy(model)
    calls = []

    def log(what):
        return lambda module, *args: calls.append((what, module))

    handles = [norm.register_forward_pre_hook(log("pre")),
               norm.register_forward_hook(log("forward")),
               norm.register_full_backward_hook(log("backward")),
               norm.register_state_dict_post_hook(
                   lambda module, state, prefix, local: state.update({prefix + "extra": 1})),
               norm.register_load_state_dict_pre_hook(log("load"))]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (theirs, model)]
    assert ct.convert(model, sync=sync) is model
    assert model[1] is norm and model[2] is norm and not norm.training and model[0].training
    assert type(norm) is (ct.SyncBatchNorm if sync else ct.BatchNorm2d)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    for m, optimizer in zip((theirs, model), optimizers):
        m(x).square().sum().backward()
        optimizer.step()
    assert calls == [("pre", norm), ("forward", norm)] * 2 + [("backward", norm)] * 2
    assert norm.bias.grad is None and norm.weight.dtype == torch.float64
    for got, want in zip(model.parameters(), theirs.parameters()):
        assert torch.allclose(got, want, rtol=1e-12, atol=0), "the optimizer's step"
    state = model.state_dict()
    assert state["1.extra"] == state["2.extra"] == 1
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("extra")})
    assert calls[-2:] == [("load", norm)] * 2
    for handle in handles:
        handle.remove()
    calls.clear()
    model(x).sum().backward()
    model.load_state_dict(model.state_dict())
    assert calls == [] and "1.extra" not in model.state_dict()


def relu_model(dtype):
    """BN–ReLU pairs in Sequentials: on the input (which takes no gradient), after a conv
    (ReLU in place), nested."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Conv2d(2, 3, 3),
        torch.nn.BatchNorm2d(3, momentum=None), torch.nn.ReLU(inplace=True),
        torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3),
                            torch.nn.ReLU())).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(-1, 1.5)   # negative scales too: either side of 0
                module.bias.normal_()
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] if torch else [],
                         ids=["float32", "float64"])
@pytest.mark.parametrize("layout", ["NCHW", "channels_last"])
def test_fused_relu_matches_batch_norm_then_relu(layout, dtype):
    theirs = relu_model(dtype)
    ours = ct.convert(relu_model(dtype), fuse_relu=True)
    assert [type(ours[i]) for i in (1, 4)] == [torch.nn.Identity] * 2
    assert ours[0].fused_relu and ours[3].fused_relu and ours[5][1].fused_relu
    assert type(ours[5][2]) is torch.nn.Identity and "fused_relu=True" in repr(ours[0])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    arrange = LAYOUTS[layout][2]
    generator = torch.Generator().manual_seed(1)
    for mode in ("train", "train", "eval"):
        x = arrange(torch.randn(4, 2, 6, 5, generator=generator, dtype=dtype))
        dy = torch.randn(4, 3, 4, 3, generator=generator, dtype=dtype)
        results = []
        for model in (theirs, ours):
            model.train(mode == "train")
            y = model(x)
            results.append([y] + list(torch.autograd.grad(y, list(model.parameters()), dy)))
        for i, (got, want) in enumerate(zip(*results)):
            assert_close(got, want, dtype, f"{mode} output {i}")
        for (key, got), want in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert_close(got, want, dtype, key)
    theirs.load_state_dict(ours.state_dict())   # the original model loads the fused one's


def test_fuse_relu_leaves_alone_what_it_cannot_fuse_exactly():
    shared = ct.BatchNorm2d(2)                     # used twice: once without the ReLU
    hooked = ct.BatchNorm2d(2)
    hooked.register_forward_hook(lambda module, args, output: None)

    class Subclass(torch.nn.Sequential):
        pass

    model = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, hooked, torch.nn.ReLU(),
                                Subclass(torch.nn.BatchNorm2d(2), torch.nn.ReLU()),
                                torch.nn.BatchNorm2d(2), torch.nn.Identity(), torch.nn.ReLU())
    ct.convert(model, fuse_relu=True)
    assert [type(m) for m in model[:7]] == [ct.BatchNorm2d, torch.nn.ReLU, ct.BatchNorm2d,
                                            ct.BatchNorm2d, torch.nn.ReLU, Subclass,
                                            ct.BatchNorm2d]
    assert not any(getattr(m, "fused_relu", False) for m in model.modules())
    fused = ct.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.ReLU()),
                       fuse_relu=True)
    with pytest.raises(ValueError, match="fused ReLU"):
        ct.convert(fused, sync=True)
    with pytest.raises(ValueError, match="fuse_relu"):
        ct.convert(torch.nn.BatchNorm2d(2), sync=True, fuse_relu=True)


def test_core_never_imports_torch():
    code = ("import sys, numpy as np, cbn; cbn.batch_norm_forward(np.ones((4, 3)));"
            "import cbn.mpi, cbn.nn; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], env=environment(), text=True,
                            capture_output=True, timeout=120)
    assert result.stdout.strip() == "False", result.stdout + result.stderr


def test_missing_torch_gives_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)            # import torch fails
    for name in [n for n in sys.modules if n == "cbn.torch" or n.startswith("cbn.torch.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[torch\]"'):
        import cbn.torch  # noqa: F401
