"""Mixed precision on the CPU: forward + backward under autocast (bf16, fp16 with a scaler) and with bf16 weights.

Every case runs the fp32 model once as the reference and once in reduced precision from the same weights,
inputs and masking draws, and checks what a GPU run would trip over: an exception (dtype mismatches), a
non-finite loss, a parameter with no gradient or a gradient in the wrong dtype, and a result far from fp32.

Autocast casts differently on the CPU and on CUDA. CPU autocast has no fp32 list for normalisation:
``layer_norm`` runs in its input's dtype. CUDA autocast runs ``layer_norm``, ``group_norm`` and the
softmaxes in fp32 (its ``fp32`` and ``fp32_set_opt_dtype`` policies), so a bf16 input comes out fp32, and
dtype bugs that the CPU hides show there. :func:`cuda_norm_policy` reproduces that part of CUDA's policy
on the CPU, so both are tested here without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from gfm.finetune.methods import LoraConfig, MethodConfig, apply_method
from gfm.finetune.model import HeadConfig, TaskModel
from tests.test_model import make_batch, tiny_encoder, tiny_mae

torch.set_num_threads(2)

LOW = (torch.bfloat16, torch.float16)

#: ops CUDA autocast runs in fp32 whatever their input (``fp32`` policy: inputs cast to fp32)
_CUDA_FP32 = {F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm, torch.native_layer_norm}
#: ops CUDA autocast gives an fp32 output (``fp32_set_opt_dtype``: ``dtype=torch.float32`` unless one is given)
_CUDA_FP32_OUT = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.Tensor.softmax,
                  torch.Tensor.log_softmax}


class _CudaNormPolicy(TorchFunctionMode):
    """While CPU autocast is on, run normalisation layers and softmaxes as CUDA autocast does: in fp32.

    A torch-function mode sits above autograd, so the casts it adds are recorded and differentiated like
    autocast's own; only the ops listed are touched, and nothing at all when autocast is off.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cpu"):
            if func in _CUDA_FP32:
                def up(t: Any) -> Any:
                    return t.float() if isinstance(t, torch.Tensor) and t.dtype in LOW else t
                with torch.autocast("cpu", enabled=False):
                    return func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})
            if func in _CUDA_FP32_OUT and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                if kwargs.get("dtype") is None and not (len(args) > 2 and args[2] is not None):
                    kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


@contextmanager
def cuda_norm_policy() -> Iterator[None]:
    """CPU autocast with CUDA's fp32 normalisation and softmax (:class:`_CudaNormPolicy`)."""
    with _CudaNormPolicy():
        yield


def _autocast(policy: str, dtype: torch.dtype) -> Any:
    """The autocast region of one mode: ``cpu`` (CPU autocast as it is) or ``cuda`` (CUDA's norm policy)."""
    @contextmanager
    def region() -> Iterator[None]:
        with torch.autocast("cpu", dtype=dtype), (cuda_norm_policy() if policy == "cuda" else nullcontext()):
            yield
    return region()


def _run(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], region: Any = None,
         scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one step (``region`` around the forward only, as a training step does)."""
    model.zero_grad(set_to_none=True)
    with region or nullcontext():
        loss = loss_fn(model)
    (loss.float() * scale).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach().float(), grads


def _check(model: nn.Module, ref: tuple[torch.Tensor, dict[str, torch.Tensor]],
           low: tuple[torch.Tensor, dict[str, torch.Tensor]], rel: float = 2e-2, cos: float = 0.99,
           scale: float = 1.0) -> None:
    """Finite loss close to fp32's; every parameter fp32 trains gets a finite gradient of its own dtype, aligned."""
    (loss_ref, g_ref), (loss, g) = ref, low
    assert torch.isfinite(loss), loss
    assert abs(float(loss - loss_ref)) <= rel * abs(float(loss_ref)), (float(loss), float(loss_ref))
    assert set(g) == set(g_ref), sorted(set(g_ref) ^ set(g))
    params = dict(model.named_parameters())
    for name, grad in g.items():
        assert grad.dtype == params[name].dtype, (name, grad.dtype)
        assert torch.isfinite(grad).all(), name
    a = torch.cat([g_ref[n].flatten().float() for n in sorted(g)])
    b = torch.cat([g[n].flatten().float() / scale for n in sorted(g)])
    assert float(F.cosine_similarity(a, b, dim=0)) > cos


def _mae_loss(model: nn.Module) -> torch.Tensor:
    return model(make_batch(C=6), torch.Generator().manual_seed(1)).loss


POLICIES = ["cpu", "cuda"]


@pytest.mark.parametrize("policy", POLICIES)
def test_mae_under_bf16_autocast(policy: str) -> None:
    model = tiny_mae().train()
    ref = _run(model, _mae_loss)
    _check(model, ref, _run(model, _mae_loss, _autocast(policy, torch.bfloat16)))
    with torch.no_grad(), _autocast(policy, torch.bfloat16):  # the loss is summed in fp32, counts exact
        out = model(make_batch(C=6), torch.Generator().manual_seed(1))
    assert out.loss.dtype == out.group_pixels_pos.dtype == out.group_loss_obs.dtype == torch.float32


@pytest.mark.parametrize("policy", POLICIES)
def test_encoder_under_bf16_autocast(policy: str) -> None:
    model = tiny_encoder().train()
    probe = torch.randn(32, generator=torch.Generator().manual_seed(2))

    def loss(m: Any) -> torch.Tensor:
        return (m.forward_features(make_batch()).float() * probe).mean()

    _check(model, _run(model, loss), _run(model, loss, _autocast(policy, torch.bfloat16)))


#: (task, head): every head :class:`TaskModel` builds
TASKS = [("scene", HeadConfig(pool="mean")), ("scene", HeadConfig(pool="cls")), ("multilabel", HeadConfig()),
         ("pixel", HeadConfig(kind="dense")), ("pixel", HeadConfig(kind="centre")),
         ("segmentation", HeadConfig(kind="dense")), ("segmentation", HeadConfig(kind="linear")),
         ("segmentation", HeadConfig(kind="progressive", channels=16)),
         ("segmentation", HeadConfig(kind="uper", channels=16))]


def _task(task: str, head: HeadConfig, lora: bool = False) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """A tiny task model (LoRA-wrapped if asked) and its training loss on a labelled batch."""
    size = 9 if task == "pixel" else 16
    batch = make_batch(C=5, H=size, W=size, seed=3)
    g = torch.Generator().manual_seed(4)
    label = {"scene": torch.randint(0, 3, (2,), generator=g), "pixel": torch.randint(0, 3, (2,), generator=g),
             "multilabel": torch.randint(0, 2, (2, 3), generator=g),
             "segmentation": torch.randint(0, 3, (2, size, size), generator=g)}[task]
    batch = replace(batch, label=label)
    model: nn.Module = TaskModel(tiny_encoder(), task, 3, head, window=size, num_bands=5, num_rows=5)
    if lora:
        model = apply_method(model, MethodConfig("lora", LoraConfig(targets=["attention", "pools", "mlp"])))
    model.train()

    def loss(m: nn.Module) -> torch.Tensor:
        out = m(batch)
        assert out.loss is not None and out.loss.dtype == torch.float32
        return out.loss

    return model, loss


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("task", "head"), TASKS, ids=[f"{t}-{h.kind}-{h.pool}" for t, h in TASKS])
def test_task_heads_under_bf16_autocast(task: str, head: HeadConfig, policy: str) -> None:
    model, loss = _task(task, head)
    _check(model, _run(model, loss), _run(model, loss, _autocast(policy, torch.bfloat16)))


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("task", ["scene", "segmentation"])
def test_lora_under_bf16_autocast(task: str, policy: str) -> None:
    """LoRA-wrapped attention, pools and MLP (the fused pools and MLP take them apart, :func:`linear_parts`)."""
    model, loss = _task(task, HeadConfig(kind="dense"), lora=True)
    ref = _run(model, loss)
    assert any("lora_A" in n for n in ref[1]) and all("lora_" in n or "task_head" in n for n in ref[1])
    _check(model, ref, _run(model, loss, _autocast(policy, torch.bfloat16)))


def _bf16_copy(model: nn.Module) -> nn.Module:
    """The model with bf16 weights, as DeepSpeed's bf16 mode keeps them (``module.bfloat16()``), fp32 inputs."""
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


@pytest.mark.parametrize("case", ["mae", "scene", "segmentation-dense", "segmentation-uper", "lora"])
def test_bf16_weights(case: str) -> None:
    model: nn.Module
    loss: Callable[[nn.Module], torch.Tensor]
    if case == "mae":
        model, loss = tiny_mae().train(), _mae_loss
    elif case == "lora":
        model, loss = _task("pixel", HeadConfig(kind="dense"), lora=True)
    else:
        task, _, kind = case.partition("-")
        model, loss = _task(task, HeadConfig(kind=kind, channels=16))  # type: ignore[arg-type]
    ref = _run(model, loss)
    low = _bf16_copy(model)
    # UPerNet's pyramid pooling batch-normalises 1×1 maps over 2 samples: the least well-conditioned
    # gradient here, which bf16 weights (not bf16 products alone) bring to a cosine of 0.97
    cos = 0.95 if case.endswith("uper") else 0.98
    _check(low, ref, _run(low, loss), rel=5e-2, cos=cos)
    _check(low, ref, _run(low, loss, _autocast("cuda", torch.bfloat16)), rel=5e-2, cos=cos)  # gfm's bf16 runs


def test_fp16_autocast_with_a_grad_scaler() -> None:
    """fp16 autocast on the CPU, the loss scaled as ``GradScaler`` does, gradients unscaled before the step."""
    model = tiny_mae().train()
    ref = _run(model, _mae_loss)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = _mae_loss(model)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    _check(model, ref, (loss.detach().float(), grads))
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**16  # no overflow was found


def test_compiled_blocks_do_not_recompile_across_steps() -> None:
    """Regional ``torch.compile`` (:func:`~gfm.train.module.compile_model`) under bf16 autocast, three SGD steps.

    The encoder's two blocks share one graph; the decoder's narrower block takes a second (its weights have
    other shapes, so a width is one graph whatever ``dynamic`` says; with the default ``dynamic=None`` that
    first shape change is dynamo's one recompile, and it makes the graph symbolic). Steps 2 and 3 (new
    pixels, new masking draws) must then run with ``error_on_recompile``. ``aot_eager``: dynamo's graphs and
    guards, forward and backward, without inductor's code generation.
    """
    from torch._dynamo.utils import counters

    from gfm.config import load
    from gfm.train.engine_config import EngineConfig
    from gfm.train.module import compile_model

    torch._dynamo.reset()
    model = tiny_mae().train()
    assert compile_model(None, model, load(EngineConfig, None, ["compile=true"]), backend="aot_eager") == 3
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for step in range(3):
        with torch._dynamo.config.patch(error_on_recompile=step > 0), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(make_batch(C=6, seed=step), torch.Generator().manual_seed(step))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert all(map(torch.isfinite, torch.tensor(losses)))
    torch._dynamo.reset()
