"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): the GAN baseline of the anomaly scorers, 2D.

Two stages on the training normals, both seeded, one command:

1. **WGAN-GP** (Gulrajani et al. 2017): a generator G: z → image and a critic D, trained with the
   gradient penalty (λ = 10, five critic steps per generator step, Adam β = (0, 0.9)). The critic has
   no batch normalisation (the penalty is per sample); its last convolutional features f(·) are what
   the encoder stage compares.
2. **izi_f encoder**: E: image → z with G and D frozen, trained to minimise
   ‖x − G(E(x))‖² / n_pixels + κ ‖f(x) − f(G(E(x)))‖² / n_features (κ = 1), so an image the
   normal manifold cannot reproduce has a large residual.

The anomaly score is that same sum on the test image; the map is the per-pixel squared residual
(x − G(E(x)))², mean = the image term. Images enter as the serving input (:mod:`services.anomaly.
preprocess`: grey levels at their bin centres in [0, 1]) and are scaled to [−1, 1] inside the
networks, so the exported graph takes what every anomaly model takes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from services.anomaly.preprocess import dequantise_centre
from services.anomaly.tasks import anomaly_task
from training.anomaly.data import load_split
from training.anomaly.tasks import plan_for

CHECKPOINT = "fanogan.pt"
#: The weight of the critic-feature residual in the score (the paper's κ).
KAPPA = 1.0
GRADIENT_PENALTY = 10.0
CRITIC_STEPS = 5


def _scaled(image: torch.Tensor) -> torch.Tensor:
    """Serving input [0, 1] → the networks' [−1, 1]."""
    return image * 2.0 - 1.0


class Generator(nn.Module):
    """z (n, latent) → image (n, 1, 64, 64) in [−1, 1]: a DCGAN decoder, 4 → 64 px."""

    def __init__(self, latent: int = 64, width: int = 16) -> None:
        super().__init__()
        self.latent, self.width = latent, width
        self.project = nn.Sequential(
            nn.Linear(latent, width * 8 * 16), nn.BatchNorm1d(width * 8 * 16), nn.ReLU()
        )
        layers: list[nn.Module] = []
        channels = [width * 8, width * 4, width * 2, width]
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers += [nn.ConvTranspose2d(width, 1, 4, 2, 1), nn.Tanh()]
        self.decode = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.project(z).view(-1, self.width * 8, 4, 4))


class _Downsampler(nn.Module):
    """64 → 4 px in four stride-2 convolutions with leaky ReLU; no batch norm (WGAN-GP's critic)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        channels = [1, width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.features = width * 8 * 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


class Critic(nn.Module):
    """image in [−1, 1] → the Wasserstein critic's value; :meth:`features` its last features f(x)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.down = _Downsampler(width)
        self.head = nn.Linear(self.down.features, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(x)).squeeze(1)


class Encoder(nn.Module):
    """image in [−1, 1] → z, the critic's architecture with a tanh-bounded latent head."""

    def __init__(self, latent: int = 64, width: int = 16) -> None:
        super().__init__()
        self.down = _Downsampler(width)
        self.head = nn.Sequential(nn.Linear(self.down.features, latent), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(x))


class FAnoGanScore(nn.Module):
    """What is exported: ``image`` (n, 1, 64, 64) in [0, 1] → ``score`` (n,) and ``residual_map``
    (n, 1, 64, 64), the per-pixel squared residual in the networks' [−1, 1] scale."""

    def __init__(self, generator: Generator, critic: Critic, encoder: Encoder, kappa: float = KAPPA) -> None:
        super().__init__()
        self.generator, self.critic, self.encoder, self.kappa = generator, critic, encoder, kappa

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _scaled(image)
        rebuilt = self.generator(self.encoder(x))
        residual = (x - rebuilt) ** 2
        feature_residual = (self.critic.features(x) - self.critic.features(rebuilt)) ** 2
        score = residual.flatten(1).mean(1) + self.kappa * feature_residual.mean(1)
        return score, residual


def _gradient_penalty(
    critic: Critic, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator
) -> torch.Tensor:
    mix = torch.rand(real.shape[0], 1, 1, 1, generator=rng)
    between = (mix * real + (1.0 - mix) * fake).requires_grad_(True)
    (gradient,) = torch.autograd.grad(critic(between).sum(), between, create_graph=True)
    return ((gradient.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def train_wgan(
    images: torch.Tensor, steps: int, batch: int, latent: int, width: int, seed: int
) -> tuple[Generator, Critic, dict]:
    """``steps`` generator updates, each after :data:`CRITIC_STEPS` critic updates."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    pick = np.random.default_rng(seed)
    generator, critic = Generator(latent, width), Critic(width)
    g_opt = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(critic.parameters(), lr=2e-4, betas=(0.0, 0.9))
    distances: list[float] = []
    bar = tqdm(range(steps), desc="f-AnoGAN stage 1: WGAN-GP")
    for step in bar:
        for _ in range(CRITIC_STEPS):
            real = images[pick.choice(len(images), batch)]
            with torch.no_grad():
                fake = generator(torch.randn(batch, latent, generator=rng))
            distance = critic(real).mean() - critic(fake).mean()
            loss = -distance + GRADIENT_PENALTY * _gradient_penalty(critic, real, fake, rng)
            d_opt.zero_grad()
            loss.backward()
            d_opt.step()
        fake = generator(torch.randn(batch, latent, generator=rng))
        g_loss = -critic(fake).mean()
        g_opt.zero_grad()
        g_loss.backward()
        g_opt.step()
        distances.append(float(distance))
        if step % 20 == 0:
            bar.set_postfix(wasserstein=f"{np.mean(distances[-20:]):.3f}")
    return (
        generator.eval(),
        critic.eval(),
        {"wasserstein_first": _mean(distances[:50]), "wasserstein_last": _mean(distances[-50:])},
    )


def train_encoder(
    images: torch.Tensor,
    generator: Generator,
    critic: Critic,
    steps: int,
    batch: int,
    latent: int,
    width: int,
    seed: int,
) -> tuple[Encoder, dict]:
    """The izi_f encoder with G and D frozen (eval mode: G's batch norm uses its running statistics,
    as at serving)."""
    torch.manual_seed(seed + 1)
    pick = np.random.default_rng(seed + 1)
    encoder = Encoder(latent, width)
    for module in (generator, critic):
        module.requires_grad_(False)
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-4, betas=(0.5, 0.999))
    losses: list[float] = []
    bar = tqdm(range(steps), desc="f-AnoGAN stage 2: encoder")
    for step in bar:
        x = images[pick.choice(len(images), batch)]
        rebuilt = generator(encoder(x))
        loss = ((x - rebuilt) ** 2).mean() + KAPPA * (
            (critic.features(x) - critic.features(rebuilt)) ** 2
        ).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return encoder.eval(), {
        "encoder_loss_first": _mean(losses[:50]),
        "encoder_loss_last": _mean(losses[-50:]),
    }


def _mean(values: list[float]) -> float:
    return round(float(np.mean(values)), 5) if values else float("nan")


def save(model: FAnoGanScore, path: Path, meta: dict) -> None:
    config = {"latent": model.generator.latent, "width": model.generator.width, "kappa": model.kappa}
    torch.save({"config": config, "state": model.state_dict(), "meta": meta}, path)


def load(path: Path) -> tuple[FAnoGanScore, dict]:
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    latent, width = data["config"]["latent"], data["config"]["width"]
    model = FAnoGanScore(
        Generator(latent, width), Critic(width), Encoder(latent, width), data["config"]["kappa"]
    )
    model.load_state_dict(data["state"])
    return model.eval(), data.get("meta", {})


def export_fanogan(model: FAnoGanScore, spatial: tuple[int, ...]) -> bytes:
    """ONNX of :class:`FAnoGanScore` as every anomaly graph is exported: input ``image``, outputs
    ``score`` and ``residual_map`` (the names :mod:`services.anomaly.scoring` reads)."""
    from services.anomaly.scoring import GAN_SCORE, RESIDUAL_MAP
    from training.anomaly.export import export_log_density

    return export_log_density(model, spatial, [GAN_SCORE, RESIDUAL_MAP])


def export_matches_torch(onnx_bytes: bytes, model: FAnoGanScore, images: np.ndarray) -> float:
    """Largest |ONNX − torch| score over ``images`` (serving input, (n, 1, *spatial))."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    [got] = session.run([session.get_outputs()[0].name], {"image": images.astype(np.float32)})
    with torch.no_grad():
        ref = model(torch.from_numpy(images.astype(np.float32)))[0].numpy()
    return float(np.max(np.abs(ref - got)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="cxr-anomaly", choices=["cxr-anomaly"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--gan-steps", type=int, default=2000, help="generator updates (5 critic updates each)"
    )
    parser.add_argument("--encoder-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="channels of the first critic layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = anomaly_task(args.task)
    plan = plan_for(args.task)
    train = load_split(args.task, plan.seeds.train, plan.cases["train"])
    normals = dequantise_centre(train.normals(), task.levels).reshape(-1, 1, *task.spatial)
    images = _scaled(torch.from_numpy(np.ascontiguousarray(normals, dtype=np.float32)))
    started = time.perf_counter()
    generator, critic, gan_meta = train_wgan(
        images, args.gan_steps, args.batch_size, args.latent, args.width, args.seed
    )
    gan_seconds = time.perf_counter() - started
    encoder, encoder_meta = train_encoder(
        images, generator, critic, args.encoder_steps, args.batch_size, args.latent, args.width, args.seed
    )
    seconds = time.perf_counter() - started
    model = FAnoGanScore(generator, critic, encoder)
    meta = {
        "task": args.task,
        "data": "normal",
        "train_seed": plan.seeds.train,
        "train_cases": len(images),
        "init": "",
        "steps": args.gan_steps,
        "encoder_steps": args.encoder_steps,
        "batch_size": args.batch_size,
        "latent": args.latent,
        "width": args.width,
        "seed": args.seed,
        "threads": args.threads,
        "gan_seconds": round(gan_seconds, 1),
        "seconds": round(seconds, 1),
        **gan_meta,
        **encoder_meta,
        "command": "python -m training.anomaly.fanogan " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save(model, args.out / CHECKPOINT, meta)
    (args.out / "train.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))
    return meta


if __name__ == "__main__":
    main()
