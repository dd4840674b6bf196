"""train-check's training run: real text, a tiny causal language model, K steps of SGD with a given loss.

The data ships with every Python: the standard library's own source files, read as bytes
(vocabulary 256, a byte per token), concatenated in name order up to `corpus_bytes`; the last
tenth is held out. Every run of one configuration sees the same batches, in the same order,
from the same initial weights, so two runs differ only by their loss function.

The model is a small pre-norm transformer (token and position embeddings, `layers` blocks of
causal self-attention and a 4x MLP, a final layer norm) whose output layer is a separate
weight [V, model_dim] with no bias: the (hidden, weight) pair the linear family takes, or,
multiplied, the logits the logits family takes. The optimizer is SGD with momentum, not Adam:
Adam divides each gradient by its own running scale, which hides a gradient that is uniformly
a few percent off; SGD's update is proportional to the gradient, so such an error shows.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 256  # bytes


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 60
    batch: int = 8
    seq: int = 64
    model_dim: int = 64
    layers: int = 2
    heads: int = 4
    lr: float = 0.1
    momentum: float = 0.9
    seed: int = 0
    dtype: str = "float32"  # the loss function's inputs (a cebench.cases dtype); the model trains in float32
    device: str = "cpu"
    corpus_bytes: int = 1 << 20
    eval_batches: int = 4

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    held_out: torch.Tensor
    files: list[str] = field(default_factory=list)
    sha256: str = ""


def load_corpus(limit: int) -> Corpus:
    """The standard library's top-level .py files, in name order, as bytes, up to `limit` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, files, size = [], [], 0
    for path in sorted(root.glob("*.py")):
        if size >= limit:
            break
        data = path.read_bytes()
        chunks.append(data)
        files.append(path.name)
        size += len(data)
    raw = b"".join(chunks)[:limit]
    if len(raw) < 4096:
        raise RuntimeError(f"too little text in {root} ({len(raw)} bytes) to train on")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    cut = int(len(data) * 0.9)
    return Corpus(data[:cut].clone(), data[cut:].clone(), files, hashlib.sha256(raw).hexdigest())


def batches(data: torch.Tensor, count: int, cfg: TrainConfig, salt: int) -> torch.Tensor:
    """[count, batch, seq + 1] windows at offsets drawn from one seeded generator (the same for every run)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + salt)
    starts = torch.randint(0, len(data) - cfg.seq - 1, (count, cfg.batch), generator=gen)
    index = starts[..., None] + torch.arange(cfg.seq + 1)
    return data[index].long()


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    """Embeddings and blocks up to the last hidden state; `head` is the output layer's weight [V, D]."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        dim = cfg.model_dim
        self.embed = torch.nn.Embedding(VOCAB, dim)
        self.pos = torch.nn.Parameter(torch.randn(cfg.seq, dim) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(dim, cfg.heads) for _ in range(cfg.layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Parameter(torch.randn(VOCAB, dim) / math.sqrt(dim))

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x).reshape(-1, x.shape[-1])


def new_model(cfg: TrainConfig) -> TinyLM:
    torch.manual_seed(cfg.seed)  # the same initial weights for every run
    return TinyLM(cfg).to(cfg.device)


def flat_weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])


# loss(hidden [N, D], head [V, D], targets [N]) -> scalar mean loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reference_loss(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The float32 reference: F.cross_entropy on the float32 logits."""
    return F.cross_entropy(F.linear(hidden, head), targets)


@dataclass
class TrainResult:
    losses: list[float]
    eval_loss: float
    weights: dict[int, torch.Tensor]  # step count -> flat float64 weights after that many steps (0: initial)


def train(cfg: TrainConfig, corpus: Corpus, loss_fn: LossFn, steps: int | None = None,
          snapshots: tuple[int, ...] = ()) -> TrainResult:
    """`steps` (default cfg.steps) SGD steps with `loss_fn` as the loss; a non-finite loss ends the run early."""
    steps = cfg.steps if steps is None else steps
    model = new_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    data = batches(corpus.train, steps, cfg, salt=0).to(cfg.device)
    weights = {0: flat_weights(model)}
    losses = []
    for step in range(steps):
        tokens = data[step]
        loss = loss_fn(model.hidden(tokens[:, :-1]), model.head, tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step + 1 in snapshots or step + 1 == steps:
            weights[step + 1] = flat_weights(model)
        if not math.isfinite(losses[-1]):
            break
    return TrainResult(losses, evaluate(cfg, corpus, model), weights)


@torch.no_grad()
def evaluate(cfg: TrainConfig, corpus: Corpus, model: TinyLM) -> float:
    """The reference loss on held-out windows (the same for every run)."""
    data = batches(corpus.held_out, cfg.eval_batches, cfg, salt=1).to(cfg.device)
    total = sum(float(reference_loss(model.hidden(t[:, :-1]), model.head, t[:, 1:].reshape(-1))) for t in data)
    return total / len(data)
