"""Stage 1 (phi pretraining): `run_stage1` throughput vs a plain PyTorch loop doing the same math.

    python -m bench stage1 --out bench/results

Cases:
  * `embeddings/paper`: precomputed (text_new, text_old) shards, the paper's phi 768->2048->2048->512;
  * `embeddings/toy`:   the toy world's phi shape (96 -> 512 -> 512 -> 64), where the math is so
    cheap that any per-sample framework cost shows up;
  * `text/toy`: raw text shards, both frozen toy text towers run on the fly (stage1.source=text).

For each case and repeat the framework run (`run_stage1`, steady-state samples/s from its own
log windows, first window dropped) and the plain loop (tensors already in memory, random batches
by index, the same phi/InfoNCE/AdamW/clipping/schedule, no data loader, no checkpoint, no
logging) run back to back, so both see the same machine load; the ratio of step times is the
framework's overhead. Target: <= 1.10 at one worker.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import LogClock, median_of, row, timed_rate
from bench.flops import device_peak_tflops, flops_per_sample, mfu
from bench.world import get_world, random_text_embeddings
from xbt_dist.config import RunConfig, load_config
from xbt_dist.data.embeddings import EmbeddingShardSet
from xbt_dist.data.shards import iter_text
from xbt_dist.losses import info_nce
from xbt_dist.models.clip import load_clip
from xbt_dist.models.phi import Phi
from xbt_dist.pipeline import CONFIG_DIR
from xbt_dist.train.backend import param_groups, warmup_cosine
from xbt_dist.train.context import WorkerContext
from xbt_dist.train.stage1 import PhiModule, run_stage1

# name -> (source, d_new, d_old, phi hidden); text cases take dims from the toy text towers.
CASES = {"embeddings/paper": ("embeddings", 768, 512, 2048),
         "embeddings/toy": ("embeddings", 96, 64, 512),
         "text/toy": ("text", None, None, 512)}


def stage1_config(out_dir: Path, source: str, data: str, hidden: int, batch: int, steps: int,
                  n: int, log_every: int, world: dict) -> RunConfig:
    cfg = load_config(CONFIG_DIR / "toy.yaml")
    cfg.out_dir = str(out_dir)
    cfg.old, cfg.new = world["old"], world["new"]
    cfg.phi.hidden = hidden
    cfg.stage1.source = source
    cfg.stage1.batch_size = batch
    cfg.stage1.epochs = steps * batch / n  # total_steps = epochs * n // batch
    if source == "embeddings":
        cfg.stage1.embeddings = data
    else:
        cfg.stage1.text_shards = data
    cfg.train.log_every, cfg.train.checkpoint_every = log_every, 0
    return cfg


class PlainStage1:
    """The stage-1 math with nothing else: in-memory rows, phi, InfoNCE, AdamW, clip, schedule."""

    def __init__(self, d_new: int, d_old: int, hidden: int, cfg: RunConfig, device: torch.device,
                 total_steps: int, encode=None):
        torch.manual_seed(0)
        self.module = PhiModule(Phi(d_new, d_old, hidden, cfg.phi.depth), cfg.stage1.temperature).to(device)
        o = cfg.stage1.optim
        self.opt = torch.optim.AdamW(param_groups(self.module, o.weight_decay), lr=o.lr,
                                     betas=(0.9, 0.98), eps=1e-6)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(o.warmup_steps, total_steps))
        self.clip, self.device, self.encode = o.grad_clip, device, encode

    def step(self, w_new: torch.Tensor | list, w_old: torch.Tensor | None = None) -> torch.Tensor:
        if self.encode is not None:  # raw text: w_new holds captions
            w_new, w_old = self.encode(w_new)
        else:
            w_new, w_old = F.normalize(w_new, dim=-1), F.normalize(w_old, dim=-1)
        phi_w, scale = self.module(w_new)
        loss = info_nce(phi_w, w_old, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def rate(self, batches, warmup: int, steps: int, batch: int) -> dict:
        """Samples/s (wall and CPU) over `steps` steps after `warmup` untimed ones."""
        last = {}

        def one(i):
            last["loss"] = self.step(*batches(i))
        # one sync at the end (CUDA), as the framework syncs only at log points
        return timed_rate(one, warmup, steps, batch, sync=lambda: last["loss"].item())


def _text_encoder(world: dict, device):
    old, new = load_clip(world["old"], device), load_clip(world["new"], device)

    @torch.no_grad()
    def encode(captions):
        w_new = new.model.encode_text(new.tokenizer(captions).to(device), normalize=True)
        w_old = old.model.encode_text(old.tokenizer(captions).to(device), normalize=True)
        return w_new, w_old
    return encode, new.embed_dim, old.embed_dim


def run_case(case: str, out: Path, world: dict, repeats: int, steps: int, batch: int,
             log_every: int, device: torch.device, peak: float | None) -> tuple[list[dict], dict]:
    source, d_new, d_old, hidden = CASES[case]
    tag = case.replace("/", "-")
    encode = None
    if source == "embeddings":
        n = steps * batch
        data = random_text_embeddings(out / "data" / f"s1-{d_new}-{d_old}-{n}", n, d_new, d_old)
        emb = EmbeddingShardSet(data)
        mem_new = torch.from_numpy(emb.load("text_new").astype("float32")).to(device)
        mem_old = torch.from_numpy(emb.load("text_old").astype("float32")).to(device)

        def batches(i):
            idx = torch.randint(0, n, (batch,), device=device)
            return mem_new[idx], mem_old[idx]
    else:
        data = world["text"]
        n = steps * batch
        captions = [t for _, t in zip(range(n), (t for _, t in iter_text(data)))]
        encode, d_new, d_old = _text_encoder(world, device)

        def batches(i):
            j = (i * batch) % max(1, len(captions) - batch)
            return captions[j:j + batch], None
        from xbt_dist.data.shards import shard_sizes
        n = sum(shard_sizes(data).values())  # epochs are a fraction of the whole corpus

    runs = []
    fw_result = {}
    for r in range(repeats):
        cfg = stage1_config(out / "runs" / f"stage1-{tag}-{r}", source, data, hidden, batch, steps, n,
                            log_every, world)
        clock = LogClock()
        fw_result = run_stage1(cfg, WorkerContext(device=device, report=clock.record))
        fw = clock.rates(batch)
        plain = PlainStage1(d_new, d_old, hidden, cfg, device, steps, encode)
        pl = plain.rate(batches, log_every, steps - log_every, batch)
        runs.append({"fw_wall": fw["wall"], "fw_cpu": fw["cpu"], "plain_wall": pl["wall"],
                     "plain_cpu": pl["cpu"], "ratio_wall": pl["wall"] / fw["wall"],
                     "ratio_cpu": pl["cpu"] / fw["cpu"]})  # = framework step time / plain step time
    plain = PlainStage1(d_new, d_old, hidden, cfg, device, steps, encode)
    fps = flops_per_sample(lambda: plain.step(*batches(0)), batch)
    med = {k: median_of([x[k] for x in runs]) for k in runs[0]}
    util = mfu(fps, med["fw_wall"]["median"], peak)
    rows = [row("stage1", case, label, med[k]["median"], unit, **_spread(med[k])) for k, label, unit in (
        ("fw_wall", "samples/s (run_stage1)", "samples/s"),
        ("plain_wall", "samples/s (plain PyTorch loop)", "samples/s"),
        ("ratio_wall", "step time ratio framework/plain (wall)", "x (target <= 1.10)"),
        ("ratio_cpu", "step time ratio framework/plain (CPU time)", "x (target <= 1.10)"))]
    rows += [
        row("stage1", case, "model FLOPs per sample", fps, "FLOP"),
        row("stage1", case, "achieved model TFLOP/s (framework)", util["achieved_tflops"], "TFLOP/s"),
        row("stage1", case, "MFU", util["mfu"], "fraction of peak" if peak else "n/a on CPU"),
        row("stage1", case, "trainable params", fw_result.get("trainable_params"), "params"),
    ]
    detail = {"case": case, "runs": runs, "trainable_params": fw_result.get("trainable_params"),
              "d_new": d_new, "d_old": d_old, "hidden": hidden, "mfu": util}
    return rows, detail


def _spread(summary: dict) -> dict:
    return {"min": summary["min"], "max": summary["max"], "n": summary["n"]}


def bench_stage1(out: str | Path, repeats: int = 3, steps: int = 20, batch: int = 512,
                 log_every: int = 4, cases: list[str] | None = None, device: str = "cpu",
                 peak_tflops: float | None = None, toy_root=None) -> dict:
    out = Path(out)
    dev = torch.device(device)
    world = get_world(out, **({"toy_root": toy_root} if toy_root is not None else {}))
    peak = device_peak_tflops(peak_tflops, dev)
    rows, details = [], []
    for case in cases or list(CASES):
        r, d = run_case(case, out, world, repeats, steps, batch, log_every, dev, peak)
        rows += r
        details.append(d)
    return {"name": "stage1", "rows": rows, "details": details,
            "config": {"repeats": repeats, "steps": steps, "batch": batch, "log_every": log_every,
                       "device": device, "world": {k: str(v) for k, v in world.items()},
                       "peak_tflops": peak},
            "notes": ["samples/s are medians over repeats; framework and plain loop alternate within "
                      "each repeat so both see the same machine load.",
                      f"model weights: {world['weights']} (throughput does not depend on them)."]}
