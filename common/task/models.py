"""Model zoo: CIFAR-style VGG / ResNet, a small MLP and CNN, and a fixed class-embedding head.

    from fedmerge.common.task.models import build_model, ClassEmbeddingHead, count_parameters, ARCHS
    model = build_model("vgg11", num_classes=10, width=1.0, in_channels=3, image_size=32, head=None)

Every model is written so that :func:`fedmerge.common.engine.graph.derive_spec` can trace it (no in-place ops, no
Python control flow on tensor values, ``torch.flatten``/adaptive pooling only), so merging needs no
hand-written spec. ``width`` scales every hidden width (``max(1, round(c * width))``); inputs and the
output/head size never scale.

Architectures (trainable parameters at width 1, CIFAR-10: 3x32x32 input, 10 classes, linear head):

==========  ===========  ==================================================================================
arch        parameters   layout
==========  ===========  ==================================================================================
vgg11        9,225,610   conv3x3 [64,M,128,M,256,256,M,512,512,M,512,512,M] + ReLU, one Linear 512->C
vgg16       14,719,818   conv3x3 [64,64,M,128,128,M,256x3,M,512x3,M,512x3,M] + ReLU, one Linear 512->C
vgg11_bn     9,228,362   as vgg11, conv (no bias) -> BatchNorm -> ReLU
vgg16_bn    14,724,042   as vgg16, conv (no bias) -> BatchNorm -> ReLU
resnet20       272,474   3x3 stem 16, 3 stages x 3 BasicBlocks (16/32/64), 1x1 conv+BN projection
                         shortcut where the shape changes (option B), global average pool, Linear 64->C
resnet18    11,173,962   3x3 stem 64 (no max-pool), 4 stages x 2 BasicBlocks (64/128/256/512), option B
                         shortcuts, global average pool, Linear 512->C
mlp          1,841,162   flatten, Linear->512, ReLU, Linear->512, ReLU, Linear->C
cnn            545,098   conv3x3 32, ReLU, max-pool, conv3x3 64, ReLU, max-pool, flatten, Linear->128,
                         ReLU, Linear->C
==========  ===========  ==================================================================================

(MNIST, 1x28x28: vgg11 9,224,458; resnet20 272,186; mlp 669,706; cnn 421,642.)

Other image sizes: a VGG max-pool is applied only while the feature map is at least 2x2 (28x28 gives
14, 7, 3, 1 and the fifth pool is left out), and an ``AdaptiveAvgPool2d(1)`` (the identity on a 1x1 map)
precedes the classifier, so the classifier is always ``Linear(512*width, C)``. ResNets use global average
pooling. The MLP and CNN compute their flattened sizes from ``in_channels`` and ``image_size``.

Head: ``head=None`` gives a trainable ``Linear`` classifier (``model.classifier``). With a
:class:`ClassEmbeddingHead` (or a ``(num_classes, D)`` array of class embeddings) the final Linear maps to
``D`` dims and the fixed head computes ``normalize(features) @ E.T / temperature``; ``E`` is a buffer
(``head.embeddings`` in the state dict), never a parameter. The merge graph treats the head as a leaf whose
input basis is fixed, so all parties keep the same label space (class-disjoint splits).

Each model carries ``model.fedmerge_config`` (a JSON-able dict: arch, num_classes, width, in_channels,
image_size, head) from which ``build_model(**cfg, head=ClassEmbeddingHead(state["head.embeddings"],
temperature=...))`` rebuilds it (see :mod:`fedmerge.common.task.checkpoint`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ARCHS", "build_model", "count_parameters", "ClassEmbeddingHead", "VGG", "ResNet", "MLP", "SmallCNN"]

ARCHS: tuple[str, ...] = ("vgg11", "vgg16", "vgg11_bn", "vgg16_bn", "resnet20", "resnet18", "mlp", "cnn")

_VGG_CFG = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (buffers such as a fixed class embedding are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- fixed class-embedding head -------------------------------------------------------------------------------
class ClassEmbeddingHead(nn.Module):
    """Fixed cosine classifier: ``logits = normalize(features) @ E.T / temperature``.

    ``E`` (``num_classes x dim``, rows L2-normalised on construction) is a buffer named ``embeddings``: it is
    saved in the state dict but never trained. ``fedmerge_fixed_input`` tells the merge graph that the
    layer feeding this head writes into a fixed basis (it is not permuted/transformed by merging).
    """

    fedmerge_fixed_input = True

    def __init__(self, embeddings, temperature: float = 0.05):
        super().__init__()
        e = _as_embedding_tensor(embeddings)
        try:
            t = float(temperature)
        except (TypeError, ValueError):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}") from None
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = t
        self.register_buffer("embeddings", F.normalize(e, dim=1))

    @property
    def num_classes(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ self.embeddings.t() / self.temperature

    def config(self) -> dict:
        return {"kind": "embedding", "dim": self.dim, "temperature": self.temperature}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, temperature={self.temperature}"

    @classmethod
    def orthonormal(cls, num_classes: int, dim: int | None = None, seed: int = 0,
                    temperature: float = 0.05) -> "ClassEmbeddingHead":
        """Seeded random orthonormal class embeddings (``dim >= num_classes``; default ``dim = num_classes``)."""
        num_classes = _positive_int(num_classes, "num_classes")
        dim = num_classes if dim is None else _positive_int(dim, "dim")
        if dim < num_classes:
            raise ValueError(f"orthonormal class embeddings need dim >= num_classes, got dim={dim} < "
                             f"num_classes={num_classes}")
        g = torch.Generator().manual_seed(int(seed))
        a = torch.randn(dim, num_classes, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)  # q: dim x num_classes with orthonormal columns
        sign = torch.sign(torch.diagonal(r))
        sign[sign == 0] = 1
        q = q * sign  # fix QR's sign ambiguity: the result depends only on the seed
        return cls(q.t().contiguous().float(), temperature=temperature)

    @classmethod
    def from_npy(cls, path, temperature: float = 0.05) -> "ClassEmbeddingHead":
        """Load a ``(num_classes, dim)`` float array saved with ``np.save``."""
        path = Path(path)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read class embeddings from {path}: {exc}") from exc
        try:
            return cls(arr, temperature=temperature)
        except ValueError as exc:
            raise ValueError(f"class embeddings in {path}: {exc}") from None


def _as_embedding_tensor(embeddings) -> torch.Tensor:
    if isinstance(embeddings, np.ndarray):
        if not (np.issubdtype(embeddings.dtype, np.floating) or np.issubdtype(embeddings.dtype, np.integer)):
            raise ValueError(f"class embeddings must be a numeric array, got dtype {embeddings.dtype}")
        e = torch.from_numpy(np.array(embeddings, dtype=np.float32))
    elif isinstance(embeddings, torch.Tensor):
        if embeddings.is_complex() or embeddings.dtype == torch.bool:
            raise ValueError(f"class embeddings must be real numbers, got dtype {embeddings.dtype}")
        e = embeddings.detach().to("cpu", torch.float32).clone()
    else:
        raise ValueError(f"class embeddings must be a (num_classes, dim) tensor or numpy array, "
                         f"got {type(embeddings).__name__}")
    if e.ndim != 2 or e.shape[0] < 1 or e.shape[1] < 1:
        raise ValueError(f"class embeddings must have shape (num_classes, dim) with both >= 1, "
                         f"got shape {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError("class embeddings contain non-finite values")
    norms = e.norm(dim=1)
    if (norms <= 1e-12).any():
        bad = torch.nonzero(norms <= 1e-12).flatten().tolist()
        raise ValueError(f"class embeddings have zero rows (classes {bad[:10]}): every class needs a direction")
    return e


# --- building blocks ------------------------------------------------------------------------------------------
class _Classifier(nn.Module):
    """Base: ``self.classifier`` (Linear to num_classes or to the head dim) and an optional fixed ``self.head``."""

    def _init_head(self, features: int, num_classes: int, head: ClassEmbeddingHead | None) -> None:
        self.classifier = nn.Linear(features, head.dim if head is not None else num_classes)
        self.head = head

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(x)
        if self.head is not None:  # a module attribute, not a tensor value: traceable
            x = self.head(x)
        return x


class VGG(_Classifier):
    def __init__(self, cfg, num_classes: int, width: float, in_channels: int, image_size: int, bn: bool,
                 head: ClassEmbeddingHead | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, image_size
        for v in cfg:
            if v == "M":
                if size >= 2:  # small inputs (e.g. 28x28): drop pools that would empty the map
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            w = _w(v, width)
            layers.append(nn.Conv2d(c, w, 3, padding=1, bias=not bn))
            if bn:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU())
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # identity on the 1x1 map of a 32x32 input
        self._init_head(c, num_classes, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:  # option B: projection only where the shape changes
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(_Classifier):
    def __init__(self, widths, blocks, num_classes: int, width: float, in_channels: int,
                 head: ClassEmbeddingHead | None = None):
        super().__init__()
        widths = [_w(c, width) for c in widths]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self._init_head(c, num_classes, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self._logits(torch.flatten(self.pool(x), 1))


class MLP(_Classifier):
    def __init__(self, num_classes: int, width: float, in_channels: int, image_size: int,
                 hidden=(512, 512), head: ClassEmbeddingHead | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(d, _w(h, width)), nn.ReLU()]
            d = _w(h, width)
        self.features = nn.Sequential(*layers)
        self._init_head(d, num_classes, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.features(torch.flatten(x, 1)))


class SmallCNN(_Classifier):
    """conv-ReLU-pool x2, flatten, Linear-ReLU, Linear: small and fast, for tests and demos."""

    def __init__(self, num_classes: int, width: float, in_channels: int, image_size: int,
                 head: ClassEmbeddingHead | None = None):
        super().__init__()
        c1, c2, h = _w(32, width), _w(64, width), _w(128, width)
        size = image_size
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU()]
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        layers += [nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU()]
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Linear(c2 * size * size, h), nn.ReLU())
        self._init_head(h, num_classes, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(self.fc(torch.flatten(self.features(x), 1)))


# --- factory --------------------------------------------------------------------------------------------------
def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if int(v) < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _resolve_head(head, num_classes: int) -> ClassEmbeddingHead | None:
    if head is None:
        return None
    if isinstance(head, ClassEmbeddingHead):
        # a private copy: one head instance passed to several build_model calls must not be shared
        h = ClassEmbeddingHead(head.embeddings.detach().clone(), temperature=head.temperature)
    elif isinstance(head, (torch.Tensor, np.ndarray)):
        h = ClassEmbeddingHead(head)
    else:
        raise ValueError(f"head must be None, a ClassEmbeddingHead or a (num_classes, dim) array of class "
                         f"embeddings, got {type(head).__name__}")
    if h.num_classes != num_classes:
        raise ValueError(f"the class-embedding head has {h.num_classes} classes but num_classes={num_classes}")
    return h


def _init_weights(model: nn.Module) -> None:
    """He (Kaiming) normal init, fan-in, for every conv and hidden Linear; zero biases; BN to (1, 0).

    torch's default (uniform, a=sqrt(5)) shrinks the signal by about sqrt(3) per layer, so an 8-conv VGG
    without BatchNorm starts with vanishing activations and does not train (measured here: VGG11x0.25,
    5 epochs on 3,500 CIFAR-10 images: 10% with the default init, 40% with this one)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (isinstance(m, nn.Linear) and m is not getattr(model, "classifier", None)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(arch: str, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                image_size: int = 32, head=None) -> nn.Module:
    """Build ``arch`` (one of :data:`ARCHS`), freshly initialised from torch's global RNG.

    head: ``None`` (trainable Linear classifier), a :class:`ClassEmbeddingHead` (copied, not shared) or a
    ``(num_classes, D)`` tensor/array of class embeddings (fixed head, default temperature).
    """
    if not isinstance(arch, str) or arch.lower() not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known architectures: {', '.join(ARCHS)}")
    arch = arch.lower()
    num_classes = _positive_int(num_classes, "num_classes")
    in_channels = _positive_int(in_channels, "in_channels")
    image_size = _positive_int(image_size, "image_size")
    try:
        width_f = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"width must be a positive number, got {width!r}") from None
    if isinstance(width, bool) or not math.isfinite(width_f) or width_f <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    h = _resolve_head(head, num_classes)

    if arch.startswith("vgg"):
        model = VGG(_VGG_CFG[arch.split("_")[0]], num_classes, width_f, in_channels, image_size,
                    bn=arch.endswith("_bn"), head=h)
    elif arch == "resnet20":
        model = ResNet((16, 32, 64), (3, 3, 3), num_classes, width_f, in_channels, head=h)
    elif arch == "resnet18":
        model = ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, width_f, in_channels, head=h)
    elif arch == "mlp":
        model = MLP(num_classes, width_f, in_channels, image_size, head=h)
    else:
        model = SmallCNN(num_classes, width_f, in_channels, image_size, head=h)
    _init_weights(model)
    model.fedmerge_config = {
        "arch": arch, "num_classes": num_classes, "width": width_f, "in_channels": in_channels,
        "image_size": image_size, "head": None if h is None else h.config(),
    }
    return model
