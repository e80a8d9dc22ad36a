"""GPU-only behaviour: bf16 precisions, torch.compile of the inner GPT, fused AdamW, SDPA kernels.

Run on a CUDA machine with ``python -m pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.train import cli

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _fit(tmp_path, *extra):
    return cli([
        "fit", "--config", "configs/pretrain/quickstart.yaml", "--trainer.accelerator=gpu", "--trainer.devices=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--trainer.val_check_interval=40", "--trainer.max_steps=80", *extra,
    ])


@pytest.mark.parametrize("precision,compile", [("bf16-mixed", True), ("bf16-true", False), ("32-true", False)])
def test_fit_on_gpu(precision, compile, tmp_path, in_repo_root):
    c = _fit(tmp_path, f"--trainer.precision={precision}", f"--model.init_args.speed.compile={str(compile).lower()}")
    assert c.trainer.global_step == 80
    history = c.trainer.callback_metrics
    assert torch.isfinite(history["train/loss"]) and history["val/loss"] < 6.5  # ln(2048) = 7.6 at the start
    throughput = next(cb for cb in c.trainer.callbacks if type(cb).__name__ == "Throughput")
    assert throughput.history and throughput.history[-1]["perf/tokens_per_sec"] > 0
    if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
        assert "perf/mfu" in throughput.history[-1]
    optimizer = c.trainer.optimizers[0]
    assert optimizer.defaults.get("fused") is True  # fused AdamW on CUDA
    assert (tmp_path / "last.ckpt").is_file()


def test_sdpa_matches_reference_on_gpu():
    cfg = GPTConfig.from_name("small", drop_rate=0.0, vocab_size=1000)
    torch.manual_seed(0)
    fast = GPTModel(cfg).cuda().eval()
    ref = GPTModel(cfg.replace(attention="reference")).cuda().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randint(0, 1000, (4, 256), device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            assert (fast(x) - ref(x)).abs().max().item() <= 1e-4
            with torch.autocast("cuda", dtype=torch.bfloat16):
                a, b = fast(x).float(), ref(x).float()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert (a - b).abs().max().item() <= 0.1 * b.abs().max().item()


def test_kv_cache_matches_full_recompute_on_gpu():
    from lit_llm.model.sampling import generate

    cfg = GPTConfig.from_name("small", drop_rate=0.0, vocab_size=1000, context_length=128)
    torch.manual_seed(0)
    model = GPTModel(cfg).cuda().eval()
    idx = torch.randint(0, 1000, (3, 20), device="cuda")
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cached = generate(model, idx, 150, use_cache=True)  # runs past the 128-token context
        full = generate(model, idx, 150, use_cache=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert torch.equal(cached, full)


def test_generate_cli_on_gpu(tmp_path, in_repo_root):
    import subprocess
    import sys

    _fit(tmp_path, "--trainer.precision=bf16-mixed", "--trainer.max_steps=20", "--trainer.val_check_interval=20")
    out = subprocess.run(
        [sys.executable, "-m", "lit_llm.generate", "--checkpoint", str(tmp_path / "last.ckpt"), "--prompt",
         "The import statement", "--max-new-tokens", "20", "--device", "cuda", "--dtype", "bfloat16"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.startswith("The import statement") and len(out) > len("The import statement")


def _train_losses(root) -> list[float]:
    import csv

    (metrics,) = root.glob("logs/version_*/metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def test_fast_path_learns_like_the_reference_path(tmp_path, in_repo_root):
    """200 steps on real text: the fast path (bf16 autocast, fused attention, compile, fused AdamW, padded
    vocabulary) follows the book-faithful path (fp32, explicit-mask attention, eager, plain AdamW) as closely as
    the reference path follows itself under another seed (the noise of the comparison)."""
    common = ["--trainer.max_steps=200", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=200",
              "--trainer.limit_val_batches=5", "--model.init_args.model.drop_rate=0.0"]
    reference = ["--trainer.precision=32-true", "--model.init_args.model.attention=reference",
                 "--model.init_args.speed.compile=false", "--model.init_args.optim.fused_adamw=false",
                 "--model.init_args.model.pad_vocab_multiple=1"]
    fast = ["--trainer.precision=bf16-mixed", "--model.init_args.speed.compile=true"]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        runs = {}
        bf16_true = ["--trainer.precision=bf16-true", "--model.init_args.speed.compile=true"]
        residual = [*fast, "--model.init_args.speed.low_precision_residual=true"]
        shipped = [*residual, "--model.init_args.speed.fused_loss=true"]  # as configs/pretrain/gpt2-124m.yaml
        for name, args, seed in [("ref", reference, 123), ("ref_other_seed", reference, 7), ("fast", fast, 123),
                                 ("fast_bf16_residual", residual, 123), ("fast_fused_loss", shipped, 123),
                                 ("bf16_true", bf16_true, 123)]:
            root = tmp_path / name
            _fit(root, *common, *args, f"--seed_everything={seed}")
            runs[name] = torch.tensor(_train_losses(root))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev

    def gap(a: str, b: str, last: int = 50) -> float:
        return (runs[a][-last:].mean() - runs[b][-last:].mean()).abs().item()

    noise = gap("ref", "ref_other_seed")
    report = {name: round(r[-50:].mean().item(), 4) for name, r in runs.items()}
    print(f"mean train loss over steps 151-200: {report}; seed noise {noise:.4f}, fast gap {gap('fast', 'ref'):.4f}, "
          f"bf16 residual gap {gap('fast_bf16_residual', 'ref'):.4f}, "
          f"+ fused loss gap {gap('fast_fused_loss', 'ref'):.4f}, "
          f"bf16-true gap {gap('bf16_true', 'ref'):.4f}; per-step max |fast - ref| "
          f"{(runs['fast'] - runs['ref']).abs().max().item():.4f}")
    assert all(len(r) == 200 for r in runs.values())
    assert runs["ref"][-50:].mean() < runs["ref"][:10].mean() - 1.0  # it learned
    assert gap("fast", "ref") <= max(2 * noise, 0.02)
    assert gap("fast_bf16_residual", "ref") <= max(2 * noise, 0.02)
    assert gap("fast_fused_loss", "ref") <= max(2 * noise, 0.02)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_matches_the_plain_head_on_gpu(autocast):
    """The Triton kernel at GPT-2's width and padded vocabulary, 8 x 1024 tokens, against the plain head's loss and
    gradients (float32: to round-off; bf16 autocast: as close as two bf16 computations of the same thing)."""
    import torch.nn.functional as F

    from lit_llm.model.fused_loss import fused_head_loss

    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(8, 1024, 768, device="cuda", generator=g, requires_grad=True)
    weight = (torch.randn(50304, 768, device="cuda", generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, 50257, (8, 1024), device="cuda", generator=g)
    targets[:, :100] = -100

    def run(fn):
        hidden.grad = weight.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = fn()
        (loss * 0.125).backward()
        return loss.detach(), hidden.grad.clone(), weight.grad.clone()

    got = run(lambda: fused_head_loss(hidden, weight, targets))
    want = run(lambda: F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten()))
    tol = dict(rtol=1e-3, atol=1e-5) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0], want[0], **tol)
    for a, b in zip(got[1:], want[1:]):
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > (0.999 if autocast else 0.99999)
        assert (a - b).norm() <= (2e-2 if autocast else 1e-4) * b.norm()
    print(f"fused loss on GPU (autocast={autocast}): loss {got[0].item():.6f} vs {want[0].item():.6f}, "
          f"relative gradient errors {((got[1] - want[1]).norm() / want[1].norm()).item():.2e} (hidden), "
          f"{((got[2] - want[2]).norm() / want[2].norm()).item():.2e} (weight)")


def test_float8_learns_like_bf16(tmp_path, in_repo_root):
    """200 steps on real text: FP8 matmuls (``model.speed.float8``, both recipes) follow the bf16 path as closely as the
    bf16 path follows itself under another seed."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    pytest.importorskip("torchao.float8")
    common = ["--trainer.max_steps=200", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=200",
              "--trainer.limit_val_batches=5", "--model.init_args.model.drop_rate=0.0",
              "--trainer.precision=bf16-mixed", "--model.init_args.speed.compile=true",
              "--model.init_args.speed.low_precision_residual=true"]
    runs = {}
    for name, args, seed in [("bf16", [], 123), ("bf16_other_seed", [], 7),
                             ("fp8_tensorwise", ["--model.init_args.speed.float8=tensorwise"], 123),
                             ("fp8_rowwise", ["--model.init_args.speed.float8=rowwise"], 123)]:
        root = tmp_path / name
        c = _fit(root, *common, *args, f"--seed_everything={seed}")
        if "fp8" in name:
            assert any(type(m).__name__ == "Float8Linear" for m in c.model.model.modules())
        runs[name] = torch.tensor(_train_losses(root))

    def gap(a: str, b: str, last: int = 50) -> float:
        return (runs[a][-last:].mean() - runs[b][-last:].mean()).abs().item()

    noise = gap("bf16", "bf16_other_seed")
    report = {name: round(r[-50:].mean().item(), 4) for name, r in runs.items()}
    print(f"FP8: mean train loss over steps 151-200: {report}; seed noise {noise:.4f}, "
          f"tensorwise gap {gap('fp8_tensorwise', 'bf16'):.4f}, rowwise gap {gap('fp8_rowwise', 'bf16'):.4f}")
    assert all(len(r) == 200 for r in runs.values())
    assert runs["bf16"][-50:].mean() < runs["bf16"][:10].mean() - 1.0  # it learned
    assert gap("fp8_tensorwise", "bf16") <= max(2 * noise, 0.02)
    assert gap("fp8_rowwise", "bf16") <= max(2 * noise, 0.02)
