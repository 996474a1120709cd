"""Tiny stage functions for distributed tests and smoke runs (importable by Ray workers).

Functions defined inside a test module cannot be unpickled by Ray workers (the test module is not
importable there), so the probes live here. They follow the real stage signature
`(cfg, ctx, resume=False, **kwargs) -> dict` and use only the `WorkerContext` API.

- `node_probe_stage`: which Ray node and process each rank runs on (multi-node placement test).
- `linear_phi_stage`: a Linear "phi" on fixed features trained with the global-batch InfoNCE
  through `ctx.make_backend` (DeepSpeed on Ray); `linear_phi_reference` is the same computation in
  one process on the whole batch. Equal results prove gather + DeepSpeed averaging are exact.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from xbt_dist.config import OptimConfig
from xbt_dist.losses import global_mean, info_nce


def node_probe_stage(cfg, ctx, resume: bool = False) -> dict:
    """Rank 0 returns every rank's Ray node id and pid (all_gather_object over gloo/NCCL)."""
    import ray
    import torch.distributed as dist

    mine = {"rank": ctx.rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine)
    return {"workers": everyone, "resume": resume}


class LinearPhi(nn.Module):
    """phi as one Linear layer plus a learnable log logit scale (0-dim, like the real modules)."""

    def __init__(self, d_in: int, d_out: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(d_out, d_in, generator=g) * d_in ** -0.5)
            self.proj.bias.zero_()
        self.log_logit_scale = nn.Parameter(torch.tensor(2.0))
        # A frozen parameter, as the real models carry frozen base weights next to the adapters.
        self.frozen = nn.Linear(d_in, d_in)
        with torch.no_grad():  # seeded too: compared across processes with different global RNGs
            self.frozen.weight.copy_(torch.randn(d_in, d_in, generator=g))
            self.frozen.bias.zero_()
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return F.normalize(self.proj(x), dim=-1), self.log_logit_scale.exp()


def fixed_features(n: int = 8, d_in: int = 12, d_out: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, d_in, generator=g),
            "target": F.normalize(torch.randn(n, d_out, generator=g), dim=-1)}


def _train_linear_phi(make_backend, rank: int, world_size: int, features: dict, optim: OptimConfig,
                      steps: int):
    x, target = features["x"], features["target"]
    n = x.shape[0] // world_size
    x, target = x[rank * n:(rank + 1) * n], target[rank * n:(rank + 1) * n]
    module = LinearPhi(x.shape[1], target.shape[1])
    backend = make_backend(module, optim, steps, n)
    losses = []
    for _ in range(steps):
        for micro in range(optim.grad_accum):
            # micro-batches: contiguous slices of the local batch, so ranks x micro tile the batch
            m = n // optim.grad_accum
            q, scale = backend.module(x[micro * m:(micro + 1) * m])
            loss = info_nce(q, target[micro * m:(micro + 1) * m], scale, rank, world_size)
            backend.backward(loss)
            backend.step()
        losses.append(float(global_mean(loss, world_size)))
    with backend.gathered():
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    return losses, state


def linear_phi_stage(cfg, ctx, resume: bool = False, features: dict | None = None,
                     optim: OptimConfig | None = None, steps: int = 1) -> dict:
    optim = optim or OptimConfig(lr=0.05, warmup_steps=0, grad_clip=0.0)
    losses, state = _train_linear_phi(ctx.make_backend, ctx.rank, ctx.world_size,
                                      features or fixed_features(), optim, steps)
    out = {"losses": losses}
    if state is not None:
        out["state"] = {k: v.tolist() for k, v in state.items()}
    return out


def linear_phi_reference(features: dict | None = None, optim: OptimConfig | None = None,
                         steps: int = 1) -> tuple[list[float], dict]:
    """The same training in this process, world size 1, plain PyTorch: the ground truth."""
    from xbt_dist.train.backend import TorchBackend

    optim = optim or OptimConfig(lr=0.05, warmup_steps=0, grad_clip=0.0)
    return _train_linear_phi(lambda m, o, t, b: TorchBackend(m, o, t), 0, 1,
                             features or fixed_features(), optim, steps)


# -- multi-process checks without Ray (torch.multiprocessing + gloo: seconds, not minutes) -----

def spawn_gloo(fn, world_size: int, *args) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined by a gloo group."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port; the tiny race with other users is acceptable in tests
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_entry, args=(world_size, port, fn, args), nprocs=world_size, join=True)


def _gloo_entry(rank: int, world_size: int, port: int, fn, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def xbt_loss_and_grads(rank: int, world_size: int, features: dict, weights: dict[str, float]):
    """XBT loss on this rank's slice; returns (global loss, {param: grad averaged over ranks}).

    The averaging is what DDP/DeepSpeed do to gradients, so equality with world_size=1 on the
    whole batch is exactly the property the distributed run needs.
    """
    import torch.distributed as dist

    from xbt_dist.losses import xbt_loss

    n = features["v_new"].shape[0] // world_size
    part = {k: v[rank * n:(rank + 1) * n] for k, v in features.items()}
    phi = LinearPhi(features["v_new"].shape[1], features["v_old"].shape[1])
    phi_v, scale = phi(part["v_new"])
    phi_w, _ = phi(part["w_new"])
    embeds = {"phi_v": phi_v, "phi_w": phi_w, "v_old": part["v_old"], "w_old": part["w_old"]}
    loss, _ = xbt_loss(embeds, weights, scale, rank, world_size)
    loss.backward()
    grads = {}
    for name, p in phi.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().clone()
        if world_size > 1:
            dist.all_reduce(g)
            g /= world_size
        grads[name] = g
    return float(global_mean(loss, world_size)), grads


TINY_CLIP = {"embed_dim": 24,
             "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 2}}


def tiny_xbt_model(seed: int = 0, d_old: int = 16):
    """The real trainable XBT module (open_clip CLIP + peft LoRA + prompts + LN deltas + phi), tiny."""
    from open_clip.model import CLIP

    from xbt_dist.models.adapters import AdaptedCLIP, AdapterConfig
    from xbt_dist.models.phi import Phi
    from xbt_dist.train.model import XBTModel

    torch.manual_seed(seed)
    new = AdaptedCLIP(CLIP(**TINY_CLIP), AdapterConfig(lora_rank=4, text_prompts=2, visual_prompts=2))
    # LoRA B starts at 0 (its A then gets no gradient); perturb it so every adapter weight is exercised.
    with torch.no_grad():
        for name, p in new.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return XBTModel(new, Phi(TINY_CLIP["embed_dim"], d_old, hidden=32, depth=2), temperature=0.1)


def tiny_xbt_batch(n: int = 8, d_old: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 16, 16, generator=g),
            "tokens": torch.randint(1, 1000, (n, 16), generator=g),
            "v_old": F.normalize(torch.randn(n, d_old, generator=g), dim=-1),
            "w_old": F.normalize(torch.randn(n, d_old, generator=g), dim=-1)}


def train_tiny_xbt(make_backend, rank: int, world_size: int, batch: dict, optim: OptimConfig,
                   steps: int = 2) -> tuple[list[float], dict | None]:
    """`steps` optimiser steps of the XBT loss on this rank's slice of `batch`; rank 0 gets the state."""
    from xbt_dist.losses import xbt_loss

    n = batch["images"].shape[0] // world_size
    part = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    model = tiny_xbt_model()
    backend = make_backend(model, optim, steps, n)
    weights = {"image_to_old_text": 1.0, "text_to_old_image": 1.0, "new_new": 1.0}
    losses = []
    for _ in range(steps):
        out = backend.module(part["images"], part["tokens"])   # root forward: ZeRO-3 hooks run
        loss, _ = xbt_loss({**out, "v_old": part["v_old"], "w_old": part["w_old"]}, weights,
                           out["logit_scale"], rank, world_size)
        backend.backward(loss)
        backend.step()
        losses.append(float(global_mean(loss, world_size)))
    with backend.gathered():
        state = model.trainable_state_dict() if rank == 0 else None
    return losses, state, backend


# -- a multi-node Ray cluster on one machine ---------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """`nodes` Ray nodes on this machine (`ray start --head` + `ray start --address`), for tests.

    Each node runs as `ray start --block` in its own session, so `stop()` ends exactly the
    processes this object started (by process group) and never touches other users' Ray
    instances (`ray stop` would). Per-node ports are picked free for everything that defaults to
    a fixed number (GCS, client server, dashboard agent), since two nodes share one host.

    `auth_dir`: token authentication ON, as `ray start` has it by default since Ray 2.60. A fresh
    token is written to `<auth_dir>/auth_token` and handed to every node and client through
    `RAY_AUTH_MODE=token` + `RAY_AUTH_TOKEN_PATH` (never ~/.ray/auth_token, which would switch
    every later local Ray on this machine to token auth). This process then never connects
    in-process (Ray caches the token mode process-wide, which would break the tests that run
    after it): it waits through `ray` subprocesses, and clients use `client_env()`.
    `dashboard`: run the dashboard (the Jobs API: `ray job submit`) on 127.0.0.1, at `dashboard_url`.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, temp_dir: str | None = None,
                 node_env: list[dict[str, str]] | None = None, auth_dir: str | None = None,
                 dashboard: bool = False):
        self.nodes, self.cpus = nodes, cpus_per_node
        self.temp_dir = temp_dir
        # Extra environment per node (its raylet and workers inherit it), e.g. a TMPDIR of its
        # own so that "node-local scratch" really differs between the two nodes.
        self.node_env = node_env or [{} for _ in range(nodes)]
        self.procs: list = []
        self.address: str | None = None
        self.dashboard_url: str | None = None
        self.dashboard = dashboard
        self.token_path: str | None = None
        if auth_dir is not None:
            import secrets
            from pathlib import Path

            Path(auth_dir).mkdir(parents=True, exist_ok=True)
            self.token_path = str(Path(auth_dir) / "auth_token")
            fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes

    def auth_env(self) -> dict[str, str]:
        """The variables a Ray process needs to talk to this cluster (empty without auth)."""
        if self.token_path is None:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def client_env(self) -> dict[str, str]:
        """Environment for `ray job ...` / driver subprocesses: this process's, plus the token and
        RAY_ADDRESS (the dashboard's URL when it runs, else the GCS address)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        env.update(self.auth_env())
        env["RAY_ADDRESS"] = self.dashboard_url or self.address or ""
        return env

    def _start_node(self, head: bool, log) -> None:
        import subprocess
        import sys
        from pathlib import Path

        ray_bin = str(Path(sys.executable).parent / "ray")
        args = [ray_bin, "start", "--block", f"--num-cpus={self.cpus}", "--num-gpus=0",
                "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        if head:
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            args += ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}"]
            if self.dashboard:
                dport = free_port()
                self.dashboard_url = f"http://127.0.0.1:{dport}"
                args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dport}"]
            else:
                args.append("--include-dashboard=false")
            if self.temp_dir:
                args.append(f"--temp-dir={self.temp_dir}")
        else:
            args.append(f"--address={self.address}")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
        env.update(self.node_env[len(self.procs)])
        # Without auth_dir the driver connects without a token; a ~/.ray/auth_token left by another
        # tool must not switch this throwaway cluster to token auth.
        env.update(self.auth_env())
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))

    def start(self, timeout: float = 300.0, log=None) -> "LocalRayCluster":
        import time

        import ray

        self._start_node(True, log)
        deadline = time.time() + timeout
        connected = False
        while not connected:
            try:
                if self.token_path is None:
                    ray.init(address=self.address, log_to_driver=False)
                else:
                    self._ray_cli(["health-check", f"--address={self.address}"], timeout=60)
                connected = True
            except Exception:  # noqa: BLE001 - GCS not up yet
                if time.time() > deadline or self.procs[0].poll() is not None:
                    self.stop()
                    raise RuntimeError(f"Ray head at {self.address} did not start")
                time.sleep(2)
        for _ in range(self.nodes - 1):
            self._start_node(False, log)
        while self._alive() < self.nodes:
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                joined = self._alive()  # before stop() disconnects
                self.stop()
                raise RuntimeError(f"only {joined} of {self.nodes} Ray nodes joined {self.address}")
            time.sleep(1)
        while self.dashboard_url is not None:  # the Jobs API answers (with the token) once it is up
            try:
                self._ray_cli(["job", "list", f"--address={self.dashboard_url}"], timeout=60)
                break
            except Exception:  # noqa: BLE001 - dashboard not up yet
                if time.time() > deadline or self.procs[0].poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the Ray dashboard at {self.dashboard_url} did not start")
                time.sleep(2)
        return self

    def _ray_cli(self, args: list[str], timeout: float = 120) -> str:
        """Run `ray ARGS` with this cluster's client environment; its stdout, or CalledProcessError."""
        import subprocess
        import sys
        from pathlib import Path

        ray_bin = str(Path(sys.executable).parent / "ray")
        return subprocess.run([ray_bin, *args], env=self.client_env(), capture_output=True, text=True,
                              check=True, timeout=timeout).stdout

    def _alive(self) -> int:
        import ray

        if self.token_path is None:
            return len([n for n in ray.nodes() if n["Alive"]])
        if self.nodes == 1:
            return 1  # the health check above saw the head
        import subprocess
        import sys

        code = ("import ray; ray.init(address='%s', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.client_env(), capture_output=True,
                             text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def node_ids(self) -> list[str]:
        import ray

        return [n["NodeID"] for n in ray.nodes() if n["Alive"]]

    def stop(self) -> None:
        import signal
        import subprocess

        import ray

        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(self.procs):  # workers first, head last
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                p.wait(timeout=10)  # `ray start --block` often ignores SIGTERM; do not wait long
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()
        # A killed head leaves its address in <temp>/ray_current_cluster, and a plain `ray.init()`
        # of anyone on this machine would then try to join the dead cluster: remove it if ours.
        from pathlib import Path
        current = Path(self.temp_dir or "/tmp/ray") / "ray_current_cluster"
        port = (self.address or "").rsplit(":", 1)[-1]
        try:
            if port and current.read_text().strip().endswith(f":{port}"):
                current.unlink()
        except OSError:
            pass


# -- deterministic stand-in encoders for embedding jobs (picklable: importable functions) -------

def _char_features(texts: list[str], dim: int, salt: int):
    import numpy as np

    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        for j, ch in enumerate(t):
            out[i, (ord(ch) * 31 + j * salt) % dim] += 1.0
    return out + 0.01


def text_encoder_old(texts: list[str]):
    return _char_features(texts, 8, 7)


def text_encoder_new(texts: list[str]):
    return _char_features(texts, 12, 13)
