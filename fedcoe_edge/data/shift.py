"""Feature shift per client: every client is a "camera" with its own fixed distortion.

Design section 5 (feature shift on top of label skew), in the spirit of FedBN's feature-shift
benchmarks (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021) and the common-corruption families of Hendrycks & Dietterich
(ICLR 2019): rotation, contrast/brightness, blur and sensor noise. A client's camera is drawn
once from its seed and applied to all its images; noise is drawn fresh per image at that
client's noise level. The global test set is seen through random cameras from the same
distribution (one per image), and cold-start clients get cameras nobody trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from fedcoe_edge.data.client import ClientData


@dataclass(frozen=True)
class Camera:
    """One client's fixed distortion of (C, H, W) images in [0, 1]."""

    angle: float  # degrees, rotation about the centre
    contrast: float  # multiplies intensities
    brightness: float  # added after the contrast
    blur: float  # Gaussian sigma in pixels (0 = sharp)
    noise: float  # std of additive Gaussian noise

    def to_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in asdict(self).items()}


def random_camera(rng: np.random.Generator, strength: float = 1.0) -> Camera:
    """A camera from the shift distribution; ``strength`` scales every distortion."""
    return Camera(angle=float(rng.uniform(-30, 30) * strength),
                  contrast=float(1.0 - rng.uniform(0.0, 0.5) * strength),
                  brightness=float(rng.uniform(0.0, 0.2) * strength),
                  blur=float(rng.uniform(0.0, 0.8) * strength),
                  noise=float(rng.uniform(0.0, 0.1) * strength))


def apply_camera(x: np.ndarray, cam: Camera, rng: np.random.Generator) -> np.ndarray:
    """Distort a batch (N, C, H, W) through ``cam``; returns float32 in [0, 1]."""
    if x.ndim != 4:
        raise ValueError(f"apply_camera expects (N, C, H, W) images, got shape {x.shape}")
    if len(x) == 0:
        return x.astype(np.float32, copy=True)
    out = x.astype(np.float64, copy=True)
    if cam.angle:
        out = ndimage.rotate(out, cam.angle, axes=(2, 3), reshape=False, order=1, mode="constant")
    if cam.blur > 0:
        out = ndimage.gaussian_filter(out, sigma=(0, 0, cam.blur, cam.blur))
    out = out * cam.contrast + cam.brightness
    if cam.noise > 0:
        out = out + rng.normal(0.0, cam.noise, out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def apply_random_cameras(x: np.ndarray, rng: np.random.Generator,
                         strength: float = 1.0) -> np.ndarray:
    """Each image through its own fresh camera: the population of cameras, for test sets."""
    out = np.empty_like(x, dtype=np.float32)
    for i in range(len(x)):
        out[i : i + 1] = apply_camera(x[i : i + 1], random_camera(rng, strength), rng)
    return out


def shift_clients(clients: dict[str, ClientData], rng: np.random.Generator,
                  strength: float = 1.0) -> dict[str, dict[str, float]]:
    """Give every client a camera and distort its train, validation, test and pool images in place.

    Returns the cameras (client id -> parameters) for the federation's metadata.
    """
    cams: dict[str, dict[str, float]] = {}
    for cid in sorted(clients):
        data = clients[cid]
        cam = random_camera(rng, strength)
        data.x_train = apply_camera(data.x_train, cam, rng)
        data.x_test = apply_camera(data.x_test, cam, rng)
        data.x_val = apply_camera(data.x_val, cam, rng)
        # a new client's pool last: its test + pool draw as many values as its whole data
        # did before the pool existed, so the global test set's cameras stay the same
        data.x_pool = apply_camera(data.x_pool, cam, rng)
        cams[cid] = cam.to_dict()
    return cams
