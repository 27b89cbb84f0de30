"""The pretrained kernel-pattern spectrum: decoded prototypes along a 1-D code, with labels.

A :class:`Spectrum` is what the autoencoder of section 4.1 leaves behind once trained: the
kernels its decoder produces for ``n_codes`` codes evenly spaced on [0, 1], a label per code,
and the cosine-dissimilarity threshold below which a kernel belongs to its nearest code.
Spectra for 3x3, 5x5 and 7x7 kernels ship with the package and load offline; larger odd sizes are
read by the 7x7 one through their central area (:mod:`kernelwatch.kernel_sizes`).

>>> import kernelwatch as kw
>>> spec = kw.Spectrum.pretrained(kernel_size=5)
>>> kernels, truth = kw.patterns.generate("off-centre", 100, 5, rng=0, noise=0.1)
>>> res = spec.classify(kernels)
>>> res.labels[:2].tolist(), bool(res.clustered.mean() > 0.9)
(['off-centre', 'off-centre'], True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kernelwatch import patterns
from kernelwatch._config import CLUSTERS, DEFAULT_SEED
from kernelwatch.classification import (
    ClassificationResult,
    PrototypeIndex,
    as_kernel_tensor,
    centre_and_normalise,
    classify_unit,
    nearest_prototype_brute_force,
)
from kernelwatch.errors import KernelWatchError
from kernelwatch.kernel_sizes import SizeApproach, adapt, choose_approach, spectrum_size
from kernelwatch.metrics import family

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: Version of the spectrum file layout; bump on any incompatible change.
SPECTRUM_FORMAT_VERSION = 1
#: A decoded prototype gets a pattern name when some clean pattern of that family is at least
#: this cosine-similar to it; otherwise it is "other".
LABEL_MIN_SIMILARITY = 0.8
#: Clean patterns per family and subtype drawn to label a spectrum.
_LABEL_BANK_SIZE = 2000
#: Noisy library kernels per family drawn to vote on the labels of a spectrum's codes.
_VOTE_BANK_SIZE = 5000
#: Votes are pooled over this many neighbouring codes on either side, so that codes that no
#: bank kernel falls nearest to take the family of their neighbourhood.
_VOTE_WINDOW = 10
#: The paper's method: the autoencoder recipe of section 4 (equal family shares, nearest-pattern
#: labels, the paper's threshold); for 3x3, k-means (section 5).
METHODS = ("autoencoder", "kmeans", "paper")
_FILES = {"autoencoder": "spectrum_k{k}.npz", "kmeans": "kmeans_k{k}.npz", "paper": "paper_k{k}.npz"}


def _shipped_file(kernel_size: int, method: str) -> Traversable:
    """The package's spectrum file of ``method`` that serves ``kernel_size`` kernels."""
    if method not in METHODS:
        raise KernelWatchError(f"unknown spectrum method {method!r}; expected one of {METHODS}")
    kernel_size = spectrum_size(kernel_size)
    if method == "paper" and kernel_size == 3:
        method = "kmeans"
    resource = resources.files("kernelwatch") / "data" / _FILES[method].format(k=kernel_size)
    if not resource.is_file():
        raise KernelWatchError(f"the package ships no {method} spectrum for {kernel_size}x{kernel_size} kernels")
    return resource


def _check_header(header: dict[str, Any], path: str | Path) -> dict[str, Any]:
    if header.get("format_version") != SPECTRUM_FORMAT_VERSION:
        raise KernelWatchError(
            f"spectrum file {path} has format version {header.get('format_version')}, "
            f"this kernelwatch reads version {SPECTRUM_FORMAT_VERSION}"
        )
    return header


def _hyperplane_basis(dim: int) -> torch.Tensor:
    """Orthonormal basis ``[dim, dim - 1]`` of the hyperplane of zero-mean vectors."""
    ones = torch.ones(dim, 1, dtype=torch.float64) / dim**0.5
    q, _ = torch.linalg.qr(torch.cat([ones, torch.eye(dim, dtype=torch.float64)[:, : dim - 1]], dim=1))
    return q[:, 1:].to(torch.float32)


class KernelAutoencoder(nn.Module):
    """The autoencoder of section 4.1: four hidden layers each way, a 1-D sigmoid code.

    Inputs are centred unit kernels ``[N, k*k]``; with ``hyperplane=True`` they are first
    expressed in an orthonormal basis of the zero-mean hyperplane (one dimension fewer).

    >>> ae = KernelAutoencoder(kernel_size=3)
    >>> ae.encode(torch.zeros(4, 9)).shape, ae.decode(torch.rand(4)).shape
    (torch.Size([4]), torch.Size([4, 9]))
    """

    def __init__(self, kernel_size: int, hidden: tuple[int, ...] = (256, 128, 64, 32), hyperplane: bool = True):
        super().__init__()
        dim = kernel_size * kernel_size
        self.kernel_size, self.hidden, self.hyperplane = kernel_size, tuple(hidden), hyperplane
        basis = _hyperplane_basis(dim) if hyperplane else torch.eye(dim)
        self.register_buffer("basis", basis)
        width = basis.shape[1]
        enc: list[nn.Module] = []
        for a, b in zip((width, *hidden), hidden):
            enc += [nn.Linear(a, b), nn.LeakyReLU(0.01)]
        self.encoder = nn.Sequential(*enc, nn.Linear(hidden[-1], 1), nn.Sigmoid())
        dec: list[nn.Module] = []
        back = tuple(reversed(hidden))
        for a, b in zip((1, *back), back):
            dec += [nn.Linear(a, b), nn.LeakyReLU(0.01)]
        self.decoder = nn.Sequential(*dec, nn.Linear(back[-1], width), nn.Tanh())

    def encode(self, unit: torch.Tensor) -> torch.Tensor:
        return self.encoder(unit @ self.basis).squeeze(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes.reshape(-1, 1)) @ self.basis.T

    def forward(self, unit: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(unit))


def centred_cosine_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` between mean-centred rows: blind to ``a * x + b`` for ``a > 0``."""
    rc = reconstruction - reconstruction.mean(dim=1, keepdim=True)
    tc = target - target.mean(dim=1, keepdim=True)
    return (1.0 - nn.functional.cosine_similarity(rc, tc, dim=1, eps=1e-8)).mean()


def label_prototypes(prototypes: np.ndarray, seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Name each prototype after the most similar clean pattern of the pattern library.

    Reproducible for a seed; no hand labelling. Returns ``(labels, similarity)``: the label is
    ``family[/subtype]`` of the best match, or ``"other"`` below :data:`LABEL_MIN_SIMILARITY`.
    """
    k = prototypes.shape[-1]
    bank, bank_labels = [], []
    for family in patterns.FAMILIES:
        if family.endswith("square") and k > patterns.MAX_SQUARE_KERNEL_SIZE:
            continue
        for subtype in patterns.SUBTYPES.get(family, (None,)):
            kernels, names = patterns.generate(family, _LABEL_BANK_SIZE, k, rng=seed, subtype=subtype)
            bank.append(kernels)
            bank_labels.append(names)
    bank_unit, _ = centre_and_normalise(torch.from_numpy(np.concatenate(bank)))
    proto_unit, _ = centre_and_normalise(torch.from_numpy(prototypes.astype(np.float32)))
    sim, best = (proto_unit @ bank_unit.T).max(dim=1)
    names = np.concatenate(bank_labels)[best.numpy()]
    labels = np.where(sim.numpy() >= LABEL_MIN_SIMILARITY, names, "other")
    return labels.astype(str), sim.numpy()


def vote_labels(prototypes: np.ndarray, seed: int = DEFAULT_SEED) -> np.ndarray:
    """Family-aware labels: each code takes the label most of the noisy library kernels it is
    nearest to carry, pooled over :data:`_VOTE_WINDOW` codes either side.

    :func:`label_prototypes` names a prototype after the pattern it looks most like; where
    families meet on the code axis that puts the border by shape alone, and the kernels of one
    family that a neighbouring family's prototypes attract get that family's name. Voting puts
    the borders where the families' kernels actually fall. Codes no vote reaches keep the
    nearest-pattern label (e.g. ``"other"``). Reproducible for a seed.
    """
    k = prototypes.shape[-1]
    rng = np.random.default_rng(seed)
    bank, names = [], []
    for family in patterns.FAMILIES:
        if family.endswith("square") and k > patterns.MAX_SQUARE_KERNEL_SIZE:
            continue
        kernels, labels = patterns.generate(family, _VOTE_BANK_SIZE, k, rng=rng)
        noise = rng.uniform(0.0, 0.3, (_VOTE_BANK_SIZE, 1, 1))
        kernels = kernels + rng.standard_normal(kernels.shape) * noise * kernels.std(axis=(1, 2), keepdims=True)
        bank.append(kernels.astype(np.float32))
        names.append(labels)
    bank_unit, _ = centre_and_normalise(torch.from_numpy(np.concatenate(bank)))
    proto_unit, _ = centre_and_normalise(torch.from_numpy(prototypes.astype(np.float32)))
    nearest, _ = nearest_prototype_brute_force(bank_unit, proto_unit)
    vocabulary, which = np.unique(np.concatenate(names), return_inverse=True)
    votes = np.zeros((len(prototypes), len(vocabulary)))
    np.add.at(votes, (nearest.numpy(), which), 1.0)
    window = np.ones(2 * _VOTE_WINDOW + 1)
    pooled = np.stack([np.convolve(votes[:, j], window, mode="same") for j in range(len(vocabulary))], axis=1)
    fallback, _ = label_prototypes(prototypes, seed=seed)
    return np.where(pooled.sum(axis=1) > 0, vocabulary[pooled.argmax(axis=1)], fallback).astype(str)


@dataclass
class Spectrum:
    """Labelled prototypes along the code axis and the threshold that decides membership.

    ``threshold`` holds for every family that ``family_thresholds`` does not name; the shipped
    5x5 and 7x7 spectra carry one threshold per family, each calibrated on the null models.
    ``code_thresholds`` (one per code, as the shipped 3x3 spectrum has) overrides both. A
    spectrum may hold several 1-D curves, one autoencoder each, laid one after the other along
    the code axis (``config["curves"]``: codes per curve; weights ``weights/curve<i>/<name>``).
    """

    kernel_size: int
    codes: np.ndarray
    prototypes: np.ndarray
    labels: np.ndarray
    threshold: float
    method: str = "autoencoder"
    provenance: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    config: dict[str, Any] = field(default_factory=dict)
    family_thresholds: dict[str, float] = field(default_factory=dict)
    code_thresholds: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise KernelWatchError(f"unknown spectrum method {self.method!r}; expected one of {METHODS}")
        n = len(self.codes)
        if self.prototypes.shape != (n, self.kernel_size, self.kernel_size) or len(self.labels) != n:
            raise KernelWatchError(
                f"inconsistent spectrum: {n} codes, prototypes {self.prototypes.shape}, {len(self.labels)} labels"
            )
        if self.code_thresholds is not None and self.code_thresholds.shape != (n,):
            raise KernelWatchError(f"inconsistent spectrum: {n} codes, {self.code_thresholds.shape} code thresholds")

    # -- loading and saving -------------------------------------------------------------------

    @classmethod
    def pretrained(cls, kernel_size: int = 5, method: str = "autoencoder") -> Spectrum:
        """Load the shipped spectrum that serves ``kernel_size`` kernels; no network involved.

        3, 5 and 7 have their own; larger odd sizes are served by the 7x7 one through their
        central area (:mod:`kernelwatch.kernel_sizes`). ``method="paper"`` loads the paper's
        method (for 3x3 its k-means, section 5) to compare with.
        """
        with resources.as_file(_shipped_file(kernel_size, method)) as path:
            return cls.load(path)

    @staticmethod
    def pretrained_provenance(kernel_size: int = 5) -> dict[str, Any]:
        """The provenance of the shipped spectrum that serves ``kernel_size`` kernels (how it
        was trained, its measured null rates), read without loading its arrays.

        >>> Spectrum.pretrained_provenance(7)["shuffled_false_positive_rate"] <= 0.03
        True
        """
        with resources.as_file(_shipped_file(kernel_size, "autoencoder")) as path:
            try:
                with np.load(path, allow_pickle=False) as data:
                    return _check_header(json.loads(str(data["header"])), path)["provenance"]
            except (OSError, ValueError, KeyError) as err:
                raise KernelWatchError(f"cannot read spectrum file {path}: {err}") from err

    @classmethod
    def load(cls, path: str | Path) -> Spectrum:
        """Read a spectrum file written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            header = json.loads(str(arrays.pop("header")))
        except (OSError, ValueError, KeyError) as err:
            raise KernelWatchError(f"cannot read spectrum file {path}: {err}") from err
        _check_header(header, path)
        weights = {key[len("weights/") :]: value for key, value in arrays.items() if key.startswith("weights/")}
        code_thresholds = arrays.get("code_thresholds")
        return cls(
            kernel_size=header["kernel_size"],
            codes=arrays["codes"],
            prototypes=arrays["prototypes"],
            labels=arrays["labels"].astype(str),
            threshold=float(header["threshold"]),
            method=header["method"],
            provenance=header["provenance"],
            weights=weights,
            config=header["config"],
            family_thresholds=header.get("family_thresholds", {}),
            code_thresholds=None if code_thresholds is None else code_thresholds.astype(np.float64),
        )

    def save(self, path: str | Path) -> Path:
        """Write the spectrum, its autoencoder weights and provenance to one ``.npz`` file."""
        header = {
            "format_version": SPECTRUM_FORMAT_VERSION,
            "kernel_size": self.kernel_size,
            "method": self.method,
            "threshold": self.threshold,
            "config": self.config,
            "provenance": self.provenance,
            "family_thresholds": self.family_thresholds,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Uncompressed: decompressing a 7x7 spectrum took 11 of the 15 ms of the first snapshot's
        # load, on the monitor's worker while the training runs (wheels are zipped anyway).
        with open(path, "wb") as f:
            np.savez(
                f,
                header=np.array(json.dumps(header)),
                codes=self.codes.astype(np.float32),
                prototypes=self.prototypes.astype(np.float32),
                labels=self.labels.astype(str),
                **{f"weights/{key}": value for key, value in self.weights.items()},
                **({} if self.code_thresholds is None else {"code_thresholds": self.code_thresholds}),
            )
        return path

    @classmethod
    def from_autoencoder(
        cls,
        model: KernelAutoencoder,
        threshold: float,
        n_codes: int,
        provenance: dict[str, Any] | None = None,
        seed: int = DEFAULT_SEED,
        vote: bool = True,
        method: str = "autoencoder",
    ) -> Spectrum:
        """Decode ``n_codes`` evenly spaced codes and label them with the pattern library: by
        :func:`vote_labels`, or with ``vote=False`` by :func:`label_prototypes` (the paper's)."""
        codes = np.linspace(0.0, 1.0, n_codes, dtype=np.float32)
        with torch.no_grad():
            prototypes = model.decode(torch.from_numpy(codes)).reshape(n_codes, model.kernel_size, model.kernel_size)
        prototypes = prototypes.numpy()
        labels = vote_labels(prototypes, seed=seed) if vote else label_prototypes(prototypes, seed=seed)[0]
        return cls(
            kernel_size=model.kernel_size,
            codes=codes,
            prototypes=prototypes,
            labels=labels,
            threshold=threshold,
            method=method,
            provenance=provenance or {},
            weights={key: value.detach().cpu().numpy() for key, value in model.state_dict().items()},
            config={"hidden": list(model.hidden), "hyperplane": model.hyperplane},
        )

    @classmethod
    def from_curves(cls, curves: list[Spectrum]) -> Spectrum:
        """One spectrum of several curves laid one after the other on the code axis, each
        curve's labels kept (codes evenly spaced on [0, 1] over all of them).

        >>> one = Spectrum.pretrained(kernel_size=5)
        >>> Spectrum.from_curves([one, one]).n_codes
        20000
        """
        first = curves[0]
        prototypes = np.concatenate([c.prototypes for c in curves])
        weights = {f"curve{i}/{key}": value for i, c in enumerate(curves) for key, value in c.weights.items()}
        return cls(
            kernel_size=first.kernel_size,
            codes=np.linspace(0.0, 1.0, len(prototypes), dtype=np.float32),
            prototypes=prototypes,
            labels=np.concatenate([c.labels for c in curves]),
            threshold=first.threshold,
            method=first.method,
            weights=weights,
            config={**first.config, "curves": [c.n_codes for c in curves]},
        )

    def autoencoder(self, curve: int = 0) -> KernelAutoencoder:
        """The trained autoencoder behind this spectrum (behind its ``curve``-th curve, if it has
        several): it decodes codes on [0, 1] to that curve's prototypes."""
        if self.method == "kmeans":
            raise KernelWatchError(f"a {self.method} spectrum has no autoencoder")
        weights = self.weights
        if "curves" in self.config:
            if not 0 <= curve < len(self.config["curves"]):
                raise KernelWatchError(f"this spectrum has {len(self.config['curves'])} curves, not curve {curve}")
            prefix = f"curve{curve}/"
            weights = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
        model = KernelAutoencoder(self.kernel_size, tuple(self.config["hidden"]), self.config["hyperplane"])
        model.load_state_dict({key: torch.from_numpy(value) for key, value in weights.items()})
        return model.eval()

    # -- classification -----------------------------------------------------------------------

    @cached_property
    def _index(self) -> PrototypeIndex:
        unit, _ = centre_and_normalise(torch.from_numpy(self.prototypes))
        return PrototypeIndex.build(unit)

    @cached_property
    def _device_indexes(self) -> dict[torch.device, PrototypeIndex]:
        return {}

    def _index_on(self, device: torch.device) -> PrototypeIndex:
        """The index on ``device`` (a GPU's: moved there once, not at every call)."""
        if device.type == "cpu":
            return self._index
        if device not in self._device_indexes:
            self._device_indexes[device] = self._index.to(device)
        return self._device_indexes[device]

    @cached_property
    def families(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct families of the codes, and each code's index into them."""
        names, which = np.unique(family(self.labels), return_inverse=True)
        return names, which.reshape(-1)

    @property
    def prototype_thresholds(self) -> np.ndarray:
        """The threshold of each code: its own (:attr:`code_thresholds`), else its family's,
        else :attr:`threshold`."""
        if self.code_thresholds is not None:
            return self.code_thresholds
        names, which = self.families
        return np.array([self.family_thresholds.get(str(name), self.threshold) for name in names], np.float64)[which]

    def approach_for(self, kernels: np.ndarray | torch.Tensor) -> SizeApproach:
        """How this spectrum reads a layer of ``[N, K, K]`` kernels (:mod:`kernelwatch.kernel_sizes`)."""
        tensor = as_kernel_tensor(kernels)
        approach = choose_approach(tensor)
        if approach.target != self.kernel_size:
            as_kernel_tensor(tensor, self.kernel_size)  # the size mismatch error
        return approach

    def classify(
        self,
        kernels: np.ndarray | torch.Tensor,
        exact: bool = False,
        threshold: float | None = None,
        approach: SizeApproach | None = None,
    ) -> ClassificationResult:
        """Label ``[N, k, k]`` kernels (numpy or torch, on any device) by their nearest prototype.

        Kernels larger than 7x7 go to the 7x7 spectrum through their central area, by
        ``approach`` (default: :meth:`approach_for` these kernels; pass a layer's approach to
        read other kernels, e.g. its shuffled copies, the same way). ``threshold`` replaces
        the spectrum's thresholds with one for all codes, e.g. the paper's
        (:data:`kernelwatch.PAPER_THRESHOLDS`).

        Labels and the clustered flag always equal those of comparing every kernel with every
        prototype. For unclustered kernels, ``dissimilarity`` and ``codes`` are exact only with
        ``exact=True`` (slower on unstructured kernels); by default they come from a near
        prototype and may overstate the distance. The work runs on the kernels' device; results
        come back as numpy arrays.
        """
        tensor = as_kernel_tensor(kernels)
        if tensor.shape[-1] != self.kernel_size:
            tensor = adapt(tensor, approach or self.approach_for(tensor))
        tensor = as_kernel_tensor(tensor, self.kernel_size)
        unit, valid = centre_and_normalise(tensor)
        index = self._index_on(tensor.device)
        thresholds = self.prototype_thresholds if threshold is None else float(threshold)
        return classify_unit(unit, valid, index, self.codes, self.labels, thresholds, exact)

    @property
    def n_codes(self) -> int:
        return len(self.codes)

    def __repr__(self) -> str:
        """One line instead of the arrays' hundreds.

        >>> Spectrum.pretrained(kernel_size=7)
        Spectrum(kernel_size=7, method='autoencoder', n_codes=10000, threshold=0.3, families=['on-centre', 'off-centre', 'on-cross', 'off-cross', 'first-derivative', 'second-derivative', 'other'])
        """
        present = {str(label).split("/")[0] for label in self.labels}
        families = [name for name in CLUSTERS if name in present]
        return (
            f"Spectrum(kernel_size={self.kernel_size}, method={self.method!r}, n_codes={self.n_codes}, "
            f"threshold={self.threshold:.3g}, families={families})"
        )

    def intervals(self) -> list[tuple[str, float, float]]:
        """Runs of equal labels along the code axis: ``(label, first code, last code)``."""
        return [(str(self.labels[s]), float(self.codes[s]), float(self.codes[e - 1])) for s, e in self._runs()]

    def interval_thresholds(self) -> list[tuple[float, float]]:
        """The lowest and highest threshold of each of :meth:`intervals`' runs.

        >>> spec = Spectrum.pretrained(7)
        >>> len(spec.interval_thresholds()) == len(spec.intervals())
        True
        """
        thresholds = self.prototype_thresholds
        return [(float(thresholds[s:e].min()), float(thresholds[s:e].max())) for s, e in self._runs()]

    def _runs(self) -> list[tuple[int, int]]:
        """``[start, end)`` of each run of equal labels along the code axis."""
        change = (np.flatnonzero(self.labels[1:] != self.labels[:-1]) + 1).tolist()
        return list(zip([0, *change], [*change, len(self.labels)]))
