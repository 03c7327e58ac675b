"""Benchmark kdrun's training step against a plain PyTorch KD loop and against the compute limit.

Three loops train resnet56 -> resnet20 with KD (T=4, alpha=0.9) at the same batch size, with the
same optimizer (SGD lr 0.05, momentum 0.9, weight decay 5e-4), on synthetic CIFAR-shaped images:

- **reference**: the way the published CIFAR distillation codebases train: torchvision transforms
  on PIL images through a DataLoader with worker processes, fp32, NCHW, and a host sync (`.item()`
  on the loss and the accuracy) every step;
- **kdrun**: the real thing: its in-memory data module (uint8 on the device, batch augmentation
  there), its Trainer and DistillStage, with the run's defaults (channels_last, amp=auto);
- **limit**: the compute limit of kdrun's step: the same models, loss, optimizer, precision and
  memory format on one resident pre-normalised batch, with no data pipeline, no bookkeeping and no
  host sync. kdrun's step can only approach it.

    python scripts/bench.py --quick            # about 70 s on 2 CPU cores (batch 64 only)
    python scripts/bench.py --quick --sweep    # also: a sweep's second run with teacher.cache=true
    python scripts/bench.py --device cuda --batch 256 --big-batch 0 --compile   # or --cuda-graphs

Per batch size one line gives the three images/s, kdrun's speedup over the reference and its share
of the limit, and seconds per epoch of ``--epoch-images`` images; then a full-test-set evaluation
(images/s, seconds, peak memory) of the plain loop and of kdrun's. The last two lines are
`efficiency <e>` (kdrun over the limit) and `speedup <x>` (kdrun over the reference), at ``--batch``.
Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdrun.config import compose, trainer_factories  # noqa: E402
from kdrun.data import build_data  # noqa: E402
from kdrun.engine.device import amp_name, resolve_amp, resolve_device  # noqa: E402
from kdrun.engine.trainer import Trainer  # noqa: E402
from kdrun.knowledge import KnowledgeSet, Step  # noqa: E402
from kdrun.knowledge.logits import KD  # noqa: E402
from kdrun.models import create_model, tap_shapes  # noqa: E402
from kdrun.schemes.stages import DistillStage  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class PeakMemory:
    """Peak memory during a block: CUDA allocator peak, or the process's resident set sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self.start, self._stop = device, 0, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.peak = self.start = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    def mib(self) -> float:
        return self.peak / 2**20

    def grown_mib(self) -> float:
        """How far the block raised memory above where it started."""
        return (self.peak - self.start) / 2**20


def synthetic_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 32x32 RGB images and labels that cover all 100 classes (for n >= 100)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), rng.permutation(np.arange(n) % 100)


# ---------------------------------------------------------------------------------------------- (a)
class PILDataset(torch.utils.data.Dataset):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        from torchvision import transforms

        self.x, self.y = x, y
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def reference_loop(x, y, batch: int, steps: int, warmup: int, workers: int, device: torch.device) -> float:
    """Images/s of the plain recipe over ``steps`` steps after ``warmup`` steps."""
    torch.manual_seed(0)
    teacher = create_model("resnet56", 100).to(device).eval()
    student = create_model("resnet20", 100).to(device).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(PILDataset(x, y), batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    done, t0 = 0, None
    while done < warmup + steps:
        for images, labels in loader:
            if done == warmup:
                t0 = time.perf_counter()
            if done >= warmup + steps:
                break
            images, labels = images.to(device), labels.to(device)
            with torch.no_grad():
                t_logits = teacher(images)
            s_logits = student(images)
            kd = F.kl_div(F.log_softmax(s_logits / 4, 1), F.softmax(t_logits / 4, 1), reduction="batchmean") * 16
            loss = 0.1 * F.cross_entropy(s_logits, labels) + 0.9 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
            _ = loss.item(), (s_logits.argmax(1) == labels).float().mean().item()  # per-step meters
            done += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- (b)
COMPILE_MODES = {"eager": None, "compile": "default", "cuda-graphs": "reduce-overhead"}


def compile_forwards(model: torch.nn.Module, mode: str | None) -> torch.nn.Module:
    """The model's forwards compiled as ``trainer.compile=true`` does it (instance attributes, so the
    module and its state dict stay plain), with torch.compile's ``mode`` (None: eager)."""
    if mode is not None:
        model.forward_taps = torch.compile(model.forward_taps, dynamic=False, mode=mode)
        model.forward = torch.compile(model.forward, dynamic=False, mode=mode)
    return model


def kd_pair(device: torch.device, mode: str | None):
    """resnet56 teacher and resnet20 student (seed 0, channels_last) and a KD knowledge set (T=4, alpha=0.9)."""
    torch.manual_seed(0)
    teacher = create_model("resnet56", 100).to(device).to(memory_format=torch.channels_last)
    student = create_model("resnet20", 100).to(device).to(memory_format=torch.channels_last)
    kset = KnowledgeSet({"kd": KD(alpha=0.9, temperature=4.0)})
    kset.setup(tap_shapes(student, 3, 32), tap_shapes(teacher, 3, 32))
    return compile_forwards(teacher, mode), compile_forwards(student, mode), kset.to(device)


def kdrun_config(npz: Path, batch: int, steps: int, amp: str):
    return compose([
        "dataset=npz", f"dataset.path={npz}", f"trainer.batch_size={batch}", f"trainer.amp={amp}",
        f"trainer.limit_train_batches={steps}", "trainer.limit_eval_batches=1", "trainer.progress=off",
        "sched=cosine",
    ])


def kdrun_loop(npz: Path, batch: int, steps: int, device: torch.device, amp: str,
               mode: str | None = None) -> tuple[float, str]:
    """Images/s of kdrun's Trainer + DistillStage on the same images (a warm-up epoch, then a timed one)."""
    cfg = kdrun_config(npz, batch, steps, amp)
    data = build_data(cfg.dataset, batch_size=batch, eval_batch_size=256, device=device, seed=0,
                      channels_last=bool(cfg.trainer.channels_last))
    amp_dtype = resolve_amp(cfg.trainer.amp, device)
    teacher, student, kset = kd_pair(device, mode)
    trainer = Trainer(cfg, data, device, amp_dtype, **trainer_factories(cfg))
    fit = trainer.fit(DistillStage(student, teacher, kset), epochs=2, lr=0.05, ckpt_dir=None)
    return fit.history[-1]["images_per_second"], amp_name(amp_dtype)


def limit_loop(batch: int, steps: int, warmup: int, device: torch.device, amp: str, mode: str | None = None) -> float:
    """Images/s of the compute limit: the same models, optimizer, KD loss, precision and memory format
    (channels_last) on one resident pre-normalised batch; no data pipeline, no bookkeeping, no host
    sync (one at the end of the timed steps)."""
    cfg = compose(["trainer.progress=off", f"trainer.amp={amp}"])
    amp_dtype = resolve_amp(cfg.trainer.amp, device)
    teacher, student, kset = kd_pair(device, mode)
    teacher.requires_grad_(False).eval()
    params = list(student.parameters())
    opt = trainer_factories(cfg)["optimizer"](params, 0.05)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), generator=gen).to(device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else torch.autocast(device.type, enabled=False))
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with autocast:
            with torch.no_grad():
                t_logits = teacher(x)
            loss, _ = kset({"logits": student(x)}, {"logits": t_logits}, Step(targets=y))
        opt.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- eval
def plain_eval(x: np.ndarray, model: torch.nn.Module, device: torch.device, batch: int = 256) -> float:
    """Images/s of the published codebases' evaluation: ToTensor + Normalize per image, no_grad forward."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(x), batch):
            images = torch.stack([tf(img) for img in x[start:start + batch]]).to(device)
            _ = model(images).argmax(1).cpu()
    return len(x) / (time.perf_counter() - t0)


def kdrun_eval(npz: Path, model: torch.nn.Module, device: torch.device, amp: str) -> float:
    """Images/s of kdrun's Trainer.evaluate over the whole test split of ``npz`` (top-1, top-5, loss)."""
    cfg = compose(["dataset=npz", f"dataset.path={npz}", f"trainer.amp={amp}", "trainer.progress=off"])
    data = build_data(cfg.dataset, batch_size=64, eval_batch_size=int(cfg.trainer.eval_batch_size), device=device,
                      seed=0, channels_last=bool(cfg.trainer.channels_last))
    trainer = Trainer(cfg, data, device, resolve_amp(cfg.trainer.amp, device), **trainer_factories(cfg))
    model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    trainer.evaluate(model)
    return data.info.n_test / (time.perf_counter() - t0)


def eval_benchmark(arch: str, n_test: int, device: torch.device, amp: str, tmp: Path) -> None:
    """Throughput and peak memory of a full-test-set evaluation, the plain loop against kdrun's."""
    xt, yt = synthetic_images(n_test, seed=2)
    npz = tmp / "eval.npz"
    np.savez(npz, x_train=xt[:256], y_train=np.arange(256) % 100, x_test=xt, y_test=yt)  # every class in training
    torch.manual_seed(0)
    model = create_model(arch, 100).to(device)
    with PeakMemory(device) as mem_a:
        ref = plain_eval(xt, model, device)
    with PeakMemory(device) as mem_b:
        own = kdrun_eval(npz, model, device, amp)
    print(f"eval {arch} on {n_test} images  reference {ref:7.1f} img/s ({n_test / ref:.2f} s, peak {mem_a.mib():.0f} "
          f"MiB, +{mem_a.grown_mib():.0f})   kdrun {own:7.1f} img/s ({n_test / own:.2f} s, peak {mem_b.mib():.0f} MiB, "
          f"+{mem_b.grown_mib():.0f})   x{own / ref:.2f}", flush=True)


# ---------------------------------------------------------------------------------------------- (c)
def sweep_cache(npz: Path, batch: int, steps: int, out: Path) -> tuple[float, float]:
    """Wall seconds of the student stage of two runs of a sweep with teacher.cache=true."""
    from kdrun.engine.checkpoint import save_checkpoint
    from kdrun.run import run

    teacher = create_model("resnet56", 100)
    save_checkpoint(out / "teacher.pt", teacher)
    times = []
    for k, temperature in enumerate((4, 2)):
        overrides = [
            "dataset=npz", f"dataset.path={npz}", f"trainer.batch_size={batch}", "trainer.epochs=2",
            f"trainer.limit_train_batches={steps}", "trainer.limit_eval_batches=1", "trainer.progress=off",
            f"teacher.checkpoint={out / 'teacher.pt'}", "teacher.cache=true", f"loss.kd.temperature={temperature}",
            f"paths.output_root={out / 'outputs'}", "trainer.save_checkpoints=false",
        ]
        summary = run(compose(overrides), run_dir=out / f"run{k}", overrides=overrides)
        times.append(summary["student_train_seconds"])
    return times[0], times[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps: about a minute on 2 CPU cores")
    p.add_argument("--sweep", action="store_true", help="also time a sweep's cached second run")
    p.add_argument("--batch", type=int, default=64, help="the batch of the efficiency and speedup lines")
    p.add_argument("--big-batch", type=int, default=None, help="the larger batch (default 256; none with --quick; "
                   "0: none)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per setting")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds per setting (median reported)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", help="kdrun's trainer.amp (the limit runs in the same precision)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models' forwards (kdrun and limit)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch.compile with mode=reduce-overhead: CUDA graphs (CUDA only)")
    p.add_argument("--epoch-images", type=int, default=50000, help="images per epoch for the s/epoch figures")
    p.add_argument("--eval-images", type=int, default=10000, help="test images of the evaluation benchmark (0: none)")
    p.add_argument("--no-reference", action="store_true", help="skip the plain reference loop (no speedup line)")
    args = p.parse_args(argv)
    args.mode = "cuda-graphs" if args.cuda_graphs else "compile" if args.compile else "eager"
    args.steps = args.steps or (20 if args.quick else 30)  # fewer: this VM's step-time noise dominates
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.big_batch = (0 if args.quick else 256) if args.big_batch is None else args.big_batch
    args.warmup = 2 if args.quick else 5
    return args


def measure(batch: int, x, y, npz: Path, device: torch.device, args) -> dict:
    """Reference, kdrun and compute-limit images/s at ``batch`` (medians of alternating rounds)."""
    mode = COMPILE_MODES[args.mode]
    runs: dict[str, list] = {"reference": [], "kdrun": [], "limit": []}
    mem_ref = None
    for _ in range(args.rounds):  # alternate, so drifting machine speed hits all three alike
        if not args.no_reference:
            with PeakMemory(device) as mem_ref:
                runs["reference"].append(reference_loop(x, y, batch, args.steps, args.warmup, args.workers, device))
        with PeakMemory(device) as mem_own:
            speed, amp = kdrun_loop(npz, batch, args.steps, device, args.amp, mode)
            runs["kdrun"].append(speed)
        runs["limit"].append(limit_loop(batch, args.steps, args.warmup, device, args.amp, mode))
    own, limit = statistics.median(runs["kdrun"]), statistics.median(runs["limit"])
    ref = statistics.median(runs["reference"]) if runs["reference"] else None
    epoch = args.epoch_images
    reference = (f"reference {ref:7.1f} img/s (peak {mem_ref.mib():.0f} MiB)   " if ref else "")
    print(f"batch {batch:4d}  {reference}kdrun {own:7.1f} img/s (amp {amp}, {args.mode}, peak {mem_own.mib():.0f} MiB)"
          f"   limit {limit:7.1f} img/s   " + (f"x{own / ref:.2f} vs reference, " if ref else "")
          + f"{own / limit:.2f} of the limit   s/epoch ({epoch} images): kdrun {epoch / own:.2f}, limit "
          f"{epoch / limit:.2f}" + (f", reference {epoch / ref:.1f}" if ref else "")
          + f"   (medians of {args.rounds} rounds)", flush=True)
    return {"speedup": own / ref if ref else None, "efficiency": own / limit}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("bench.py: --cuda-graphs needs a CUDA device")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    batches = [args.batch] + ([args.big_batch] if args.big_batch and args.big_batch != args.batch else [])
    n = max(batches) * (args.steps + args.warmup + 1)
    x, y = synthetic_images(n)
    from kdrun.engine.device import cpu_has_native_bf16

    cpu = f", CPU bf16 instructions: {'yes' if cpu_has_native_bf16() else 'no'}" if device.type == "cpu" else ""
    print(f"device {device} ({torch.get_num_threads()} threads{cpu}), torch {torch.__version__}, "
          f"{n} synthetic 32x32 images, resnet56 -> resnet20 KD, {args.steps} timed steps, {args.mode}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "bench.npz"
        xt, _ = synthetic_images(512, seed=1)
        np.savez(npz, x_train=x, y_train=y, x_test=xt, y_test=y[np.arange(512) % len(y)])  # labels seen in training
        results = {batch: measure(batch, x, y, npz, device, args) for batch in batches}
        if args.eval_images:
            eval_benchmark("resnet20" if args.quick else "resnet56", args.eval_images, device, args.amp, Path(tmp))
        if args.sweep:
            first, second = sweep_cache(npz, args.batch, args.steps, Path(tmp))
            print(f"sweep with teacher.cache=true: first run {first:.1f} s, second run {second:.1f} s "
                  f"(x{first / second:.2f} faster)")
    print(f"efficiency {results[args.batch]['efficiency']:.2f}")
    if results[args.batch]["speedup"] is not None:
        print(f"speedup {results[args.batch]['speedup']:.2f}")


if __name__ == "__main__":
    main()
