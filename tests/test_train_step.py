"""The Ray-free training step (pipelines/train/step.py): collectives on the training device,
the precision rule, fp16 loss scaling, fp32 master weights, RNG state. No GPU here: where a
GPU behaviour matters it is imitated on CPU (a process group that serves one device type
only, CPU fp16 autocast with GradScaler("cpu"), faked device capabilities), as each test says.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port


def _tiny_model(seed: int = 0, vocab: int = 50):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0, bos_token_id=0, eos_token_id=0))


def _batch(seed: int, lengths=(5, 9, 7, 12), vocab: int = 50) -> dict:
    from pipelines.train.data import collate

    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, vocab, size=n) for n in lengths]
    labels = [np.where(rng.random(len(r)) < 0.3, -100, r) for r in rows]
    return collate({"input_ids": np.array(rows, dtype=object), "labels": np.array(labels, dtype=object)}, 0)


def _step(model, raw, world: int, **kw):
    from pipelines.train.step import TrainStep

    args = dict(lr=3e-3, weight_decay=0.1, warmup_steps=2, max_steps=20, min_lr_ratio=0.1, grad_clip=1.0,
                micro_batch_size=2)
    args.update(kw)
    return TrainStep(model, raw, "cpu", world, **args)


# -- collectives -----------------------------------------------------------------------------


def _collective_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A group whose only backend serves the training device's type (cpu here), the way NCCL
    # serves only cuda, and "cuda" as the default device: a tensor made without an explicit
    # device is then off the training device, as a CPU tensor is for NCCL. Without CUDA its
    # creation fails; with CUDA the group refuses it ("No backend type associated with
    # device type cuda"). Either way no guard or mock is involved.
    dist.init_process_group("cpu:gloo", rank=rank, world_size=world)
    try:
        raw = _tiny_model()
        trainer = _step(DDP(raw), raw, world)
        with torch.device("cuda"):
            try:
                dist.all_reduce(torch.zeros(2))  # the control: a default-device tensor must fail
                out[f"control{rank}"] = "passed"
            except Exception as e:  # noqa: BLE001
                out[f"control{rank}"] = f"{type(e).__name__}: {e}"
            half = slice(2 * rank, 2 * rank + 2)
            results = [trainer.run({k: v[half] for k, v in _batch(s).items()}, flag=float(rank == 0))
                       for s in range(3)]
        out[rank] = [(r.loss, r.n_targets, r.applied, r.flag) for r in results]
    except Exception as e:  # noqa: BLE001 - reported to the test
        out[rank] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


def _cuda_only_group_premise(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cuda:gloo", rank=0, world_size=1)
    try:
        dist.all_reduce(torch.tensor([3.0, 4.0]))
        out["error"] = None
    except RuntimeError as e:
        out["error"] = str(e)
    finally:
        dist.destroy_process_group()


def _in_spawned_processes(fn, nprocs: int, *args) -> dict:
    """Run fn(rank, *args, out) in fresh processes and return what they put in `out`. Spawned,
    never forked, and no process group in this one: the test session is a Ray driver, whose
    gRPC threads a fork would copy mid-call."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(fn, args=(*args, out), nprocs=nprocs, join=True, start_method="spawn")
        return dict(out)


def test_a_cuda_only_group_refuses_a_cpu_tensor_as_nccl_does():
    """The premise of the next test, with the issue's group: "cuda:gloo" on CPU refuses a
    CPU tensor with NCCL's message (the code before the fix sent its step counts this way)."""
    out = _in_spawned_processes(_cuda_only_group_premise, 1, free_port())
    assert out["error"] and "No backend type associated with device type cpu" in out["error"], out


def test_step_collectives_run_on_the_training_device():
    """Two DDP workers take training steps under a process group that serves only their
    device type, with another device as the default. With the step counts all-reduced from
    a tensor made on the default device (the code before this test) every step fails, as
    NCCL fails on a CPU tensor."""
    out = _in_spawned_processes(_collective_worker, 2, 2, free_port())
    assert out["control0"] != "passed" and "cuda" in out["control0"].lower(), out  # the setup catches it
    assert isinstance(out[0], list) and isinstance(out[1], list), out
    assert out[0] == out[1]  # every rank sees the same all-reduced loss, counts and flag
    assert all(applied and flag == 1.0 for _, _, applied, flag in out[0])
    # n_targets counts the whole global batch (both workers' halves)
    assert out[0][0][1] == int((_batch(0)["labels"][:, 1:] != -100).sum())


def test_gradient_accumulation_is_the_same_for_1_and_2_workers():
    """One worker with 2 micro-batches vs two workers (DDP averages their gradients) with 1
    each; the loss normalisation makes the averaged gradient equal the one-worker one."""
    from pipelines.train.data import count_targets, micro_batches
    from pipelines.train.step import accumulate_gradients

    model = _tiny_model()
    batch = _batch(0)
    n = count_targets(batch["labels"])

    def grads(chunks_per_worker):
        world = len(chunks_per_worker)
        total = [torch.zeros_like(p) for p in model.parameters()]
        for chunks in chunks_per_worker:
            model.zero_grad()
            accumulate_gradients(model, chunks, n, world, "cpu")
            for t, p in zip(total, model.parameters()):
                t += p.grad / world  # what DDP's all-reduce mean does
        return total

    one = grads([micro_batches(batch, 2)])
    half = lambda s: {k: v[s] for k, v in batch.items()}  # noqa: E731
    two = grads([micro_batches(half(slice(0, 2)), 2), micro_batches(half(slice(2, 4)), 2)])
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_precision_follows_compute_capability(monkeypatch, capability, expected):
    """bf16 only on native-bf16 GPUs (V100 = 7.0 and T4 = 7.5 get fp16 although
    torch.cuda.is_bf16_supported() says yes there). The GPU is faked: none here."""
    from zhchat.runtime import autocast_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert autocast_dtype("cuda") is expected
    assert autocast_dtype("cuda:1") is expected
    assert autocast_dtype("cuda", "fp32") is None
    assert autocast_dtype("cpu") is None  # fp32 on CPU unless asked
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16 and autocast_dtype("cpu", "fp16") is torch.float16


def test_fp16_uses_a_grad_scaler_and_bf16_does_not():
    from pipelines.train.step import Precision

    assert Precision(torch.device("cpu"), "fp16").scaler is not None
    assert Precision(torch.device("cpu"), "bf16").scaler is None
    assert Precision(torch.device("cpu"), "auto").dtype is None


def test_fp16_step_the_scaler_skips_advances_neither_schedule_nor_step():
    """CPU fp16 autocast with GradScaler("cpu"), started at a scale that overflows fp16
    gradients: the first steps are skipped (scale backs off), and those steps leave the
    weights, the LR schedule and the applied-step count alone."""
    model = _tiny_model()
    trainer = _step(model, model, 1, precision="fp16", init_scale=2.0**40)
    skipped = applied = 0
    for s in range(40):
        before = [p.detach().clone() for p in model.parameters()]
        lr_before, epoch_before = trainer.lr, trainer.scheduler.last_epoch
        r = trainer.run(_batch(s))
        assert r.finite
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        if r.applied:
            applied += 1
            assert changed and trainer.scheduler.last_epoch == epoch_before + 1
        else:
            skipped += 1
            assert not changed and trainer.scheduler.last_epoch == epoch_before and trainer.lr == lr_before
    assert skipped >= 3 and applied >= 10, (skipped, applied)
    assert trainer.scheduler.last_epoch == applied  # the schedule counts applied steps only
    assert trainer.scaler.get_scale() < 2.0**40


def test_fp16_scaler_state_round_trips_through_state_dict():
    model = _tiny_model()
    trainer = _step(model, model, 1, precision="fp16", init_scale=2.0**40)
    for s in range(6):
        trainer.run(_batch(s))
    state = trainer.state_dict()
    assert "scaler" in state and state["scaler"]["scale"] == trainer.scaler.get_scale()
    fresh_model = _tiny_model()
    fresh = _step(fresh_model, fresh_model, 1, precision="fp16")  # default scale 2**16
    fresh.load_state_dict(state)
    assert fresh.scaler.get_scale() == trainer.scaler.get_scale()
    assert fresh.scaler.state_dict()["_growth_tracker"] == trainer.scaler.state_dict()["_growth_tracker"]


def test_pretrained_model_saved_in_bf16_trains_in_fp32(tmp_path):
    """transformers 5 loads the saved dtype; training needs fp32 master weights."""
    from pipelines.train.model import load_pretrained, load_training_model
    from zhchat.tokenizer import load_tokenizer

    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    model = _tiny_model(vocab=len(tok)).to(torch.bfloat16)
    model.config.n_positions = 16
    model.save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16  # the trap
    loaded = load_pretrained(str(tmp_path / "bf16"), load_tokenizer(str(tmp_path / "bf16")), 16)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert {p.dtype for p in load_training_model(str(tmp_path / "bf16")).parameters()} == {torch.float32}


def test_gpt2_gelu_runs_as_one_fused_kernel_with_the_same_outputs(tmp_path):
    """Presets and pretrained GPT-2s ("gelu_new", six elementwise ops) train with torch's fused
    tanh GELU: the same function, so a hub checkpoint's outputs do not change."""
    from pipelines.train.model import FUSED_GELU, SpecialIds, build_model, load_pretrained
    from zhchat.tokenizer import load_tokenizer

    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    assert build_model("tiny", len(tok), 16, SpecialIds.of(tok)).config.activation_function == FUSED_GELU
    torch.manual_seed(0)
    hub = _tiny_model(vocab=len(tok))
    hub.config.n_positions = 16
    assert hub.config.activation_function == "gelu_new"  # what GPT-2 checkpoints say
    hub.save_pretrained(tmp_path / "hub")
    tok.save_pretrained(tmp_path / "hub")
    loaded = load_pretrained(str(tmp_path / "hub"), load_tokenizer(str(tmp_path / "hub")), 16).eval()
    assert loaded.config.activation_function == FUSED_GELU
    x = torch.randint(0, len(tok), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, hub.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)


# -- RNG state -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch_in_value_and_gradient(dtype):
    """pipelines.train.loss: the same loss and logits gradient as F.cross_entropy (fp32
    maths), ignored positions included, across several row chunks and an upstream scale."""
    import torch.nn.functional as F

    from pipelines.train.loss import chunk_rows, sum_cross_entropy

    torch.manual_seed(0)
    vocab = 3000
    n = 5 * chunk_rows(vocab) + 7                        # several chunks and a short last one
    x = (torch.randn(n, vocab) * 4).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,))
    t[::5] = -100
    ours = sum_cross_entropy(x, t)
    (ours * 0.3).backward()
    g_ours, x.grad = x.grad.clone(), None
    ref = F.cross_entropy(x.float(), t, ignore_index=-100, reduction="sum")
    (ref * 0.3).backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-3)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)  # one bf16 rounding
    torch.testing.assert_close(g_ours.float(), x.grad.float(), **tol)
    assert g_ours.dtype == dtype and not g_ours[::5].any()   # ignored positions get no gradient
    with pytest.raises(ValueError, match="tokens, vocab"):
        sum_cross_entropy(x.detach()[None], t)


def test_checkpoint_rng_state_holds_no_cuda_state(monkeypatch):
    """A worker that comes back seeing fewer GPUs must restore fine: the CUDA generators are
    reseeded every step, so no CUDA state is saved, and an old checkpoint's is ignored.
    CUDA is faked as present: get_rng_state_all must not even be called."""
    from pipelines.train import checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def no_call(*a, **k):
        raise AssertionError("CUDA RNG state touched")

    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_call)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", no_call)
    states = checkpoint.rng_states()
    assert set(states) == {"python", "numpy", "torch"}
    x = torch.rand(3)
    checkpoint.set_rng_states({**states, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 8})
    assert torch.equal(torch.rand(3), x)


# -- repeated failures ------------------------------------------------------------------------------


def test_a_step_failing_in_three_attempts_is_not_retried(tmp_path):
    from pipelines.train.checkpoint import failure_records, record_failure, repeated_failure

    run = str(tmp_path / "run")
    record_failure(run, attempt=1, rank=0, step=7, cause="RuntimeError: boom")
    record_failure(run, attempt=1, rank=1, step=7, cause="RuntimeError: boom")  # same attempt, other rank
    record_failure(run, attempt=2, rank=0, step=7, cause="RuntimeError: boom")
    assert repeated_failure(failure_records(run), after_step=4) is None  # two attempts so far
    record_failure(run, attempt=3, rank=1, step=7, cause="RuntimeError: boom")
    records = failure_records(run)
    assert repeated_failure(records, after_step=4) == 7
    assert repeated_failure(records, after_step=8) is None  # resuming past it: not stuck there
    assert records[-1]["cause"] == "RuntimeError: boom" and records[-1]["step"] == 7
