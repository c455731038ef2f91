"""Torch definitions of the digits classifiers (dev/benchmark only; onnxshrink never imports torch).

``build(name)`` returns a fresh module; ``load_torch(name)`` returns it with the trained weights (the
committed state_dict ``models/digits/<name>.weights.npz``; the ONNX export renames and transposes some
weights, so they are not read back from the ONNX file).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: nn.Module | None = None):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


class PlainCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 32, act=nn.ReLU()), conv_bn(32, 32, act=nn.ReLU()), nn.MaxPool2d(2),
            conv_bn(32, 64, act=nn.ReLU()), conv_bn(64, 64, act=nn.ReLU()), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride, act=nn.ReLU())
        self.conv2 = conv_bn(cout, cout, 3)
        self.shortcut = conv_bn(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, then blocks (w, w), (w, 2w, stride 2), (2w, 2w): the first ``depth`` of them."""

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn(1, w, act=nn.ReLU())
        blocks = [BasicBlock(w, w), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 2 * w)][:depth]
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(w if depth == 1 else 2 * w, 10)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.ReLU6()),
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6()),
            conv_bn(hidden, cout, 1),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNet(nn.Module):
    """Stem c0, inverted residuals (c0, c0), (c0, c1, stride 2), (c1, c1), 1x1 conv to c2."""

    def __init__(self, widths: tuple[int, int, int] = (32, 48, 128)) -> None:
        super().__init__()
        c0, c1, c2 = widths
        self.features = nn.Sequential(
            conv_bn(1, c0, act=nn.ReLU6()),
            InvertedResidual(c0, c0, 1), InvertedResidual(c0, c1, 2), InvertedResidual(c1, c1, 1),
            conv_bn(c1, c2, 1, act=nn.ReLU6()),
        )
        self.fc = nn.Linear(c2, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class InceptionModule(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        relu = nn.ReLU
        self.b1 = conv_bn(cin, 16, 1, act=relu())
        self.b2 = nn.Sequential(conv_bn(cin, 16, 1, act=relu()), conv_bn(16, 32, 3, act=relu()))
        self.b3 = nn.Sequential(conv_bn(cin, 8, 1, act=relu()), conv_bn(8, 16, 3, act=relu()),
                                conv_bn(16, 16, 3, act=relu()))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, 16, 1, act=relu()))

    out_channels = 16 + 32 + 16 + 16

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        c = InceptionModule.out_channels
        self.stem = conv_bn(1, 32, act=nn.ReLU())
        self.mod1 = InceptionModule(32)
        self.pool = nn.MaxPool2d(2)
        self.mod2 = InceptionModule(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.mod2(self.pool(self.mod1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.net(x)


class Attention(nn.Module):
    """Multi-head self-attention written out (q/k/v projections, head split by reshape)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """4x4 patches of a 16x16 image (16 tokens), dim 64, 4 heads, 2 pre-LN blocks, mean-pooled head."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


MODULES = {
    "cnn": PlainCNN, "resnet": ResNet, "mobilenet": MobileNet, "inception": Inception,
    "mlp": MLP, "vit": TinyViT,
    # compute-bound variants on 32x32 inputs (models.digits.WIDE): twice as wide; the residual net keeps
    # two blocks so its ONNX file stays under 2 MB
    "resnet_wide": lambda: ResNet(64, depth=2),
    "mobilenet_wide": lambda: MobileNet((64, 128, 256)),
}


def build(name: str) -> nn.Module:
    if name not in MODULES:
        raise KeyError(f"unknown digits model {name!r}; known: {', '.join(MODULES)}")
    return MODULES[name]()


def load_torch(name: str) -> nn.Module:
    """The torch module ``name`` in eval mode with its trained weights (``<name>.weights.npz``, written
    next to the ONNX file by ``train_digits.py``)."""
    import numpy as np

    from models import digits

    path = digits.trained_path(name).with_suffix(".weights.npz")
    module = build(name)
    with np.load(path) as z:
        state = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise KeyError(f"{path}: weights do not match {type(module).__name__}: missing {missing}, "
                       f"unexpected {unexpected}")
    return module.eval()
