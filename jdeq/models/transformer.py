"""The DEQ-Transformer language model (Bai, Kolter & Koltun 2019, arXiv 1909.01377) and its explicit
weight-tied counterpart.

Both embed the tokens, ``x = E[tokens] + P[:T]`` (token and learned position embeddings), apply one
weight-tied causal transformer block with input injection::

    h = LN(z + x + Attention_causal(z + x))
    f(z, x) = LN(h + MLP(h) + x)

and project ``LN(z)`` to the vocabulary. :class:`DEQTransformerLM` returns the logits of the equilibrium
``z* = f(z*, x)`` (each sequence its own fixed-point problem, differentiated implicitly);
:class:`WeightTiedTransformerLM` applies the same block ``depth`` times from ``z = 0`` and backpropagates
through the layers. The two have the same parameters (same names and shapes), so weights move between them.
:class:`TeacherForced` turns either into a model that :func:`jdeq.train.fit` trains on windows of text.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..gradients import GradientMode
from ..nn import DEQ
from ..solvers import Solver
from .mdeq import ZOO_SOLVER, OwnKindGuess


class TransformerBlock(linen.Module):
    """One post-LayerNorm causal transformer block with input injection, ``f(z, x)`` on ``(B, T, D)``:
    ``h = LN(z + x + Attention_causal(z + x))``, ``f(z, x) = LN(h + MLP(h) + x)``.

    The injection enters both LayerNorms: with ``x`` of unit scale, each LayerNorm divides ``z``'s share by about
    ``sqrt(1 + |x|²/|z|²)``, and the attention output and the MLP's second layer start at ``scale`` times the default
    (fan-in) init, so the map starts as a contraction; LayerNorm keeps the state bounded.
    """

    dim: int
    heads: int = 4
    mlp_ratio: int = 4
    scale: float = 0.5
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
        heads_ok = isinstance(self.heads, (int, np.integer)) and not isinstance(self.heads, bool) and self.heads >= 1
        if not (heads_ok and self.dim % self.heads == 0):
            raise ValueError(
                f"TransformerBlock: dim ({self.dim}) must be a multiple of heads ({self.heads!r}): each attention "
                "head reads dim / heads features"
            )
        dtype = self.param_dtype
        small = linen.initializers.variance_scaling(self.scale**2, "fan_in", "normal")
        h = z + x
        mask = linen.make_causal_mask(jnp.ones(h.shape[:2], jnp.int32))
        attention = linen.MultiHeadDotProductAttention(
            self.heads, dtype=dtype, param_dtype=dtype, out_kernel_init=small, name="attention"
        )
        h = linen.LayerNorm(dtype=dtype, param_dtype=dtype, name="norm_attention")(h + attention(h, mask=mask))
        m = linen.Dense(self.mlp_ratio * self.dim, dtype=dtype, param_dtype=dtype, name="mlp_in")(h)
        m = linen.Dense(self.dim, dtype=dtype, param_dtype=dtype, kernel_init=small, name="mlp_out")(jax.nn.gelu(m))
        return linen.LayerNorm(dtype=dtype, param_dtype=dtype, name="norm_mlp")(h + m + x)


def check_tokens(tokens: jax.Array, vocab_size: int, max_len: int) -> None:
    """ValueError unless ``tokens`` is an integer ``(B, T)`` batch with ``T <= max_len`` and (when concrete) every
    id in ``[0, vocab_size)``."""
    if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(
            f"a transformer LM takes integer tokens (batch, length), got shape {jnp.shape(tokens)} "
            f"dtype {jnp.result_type(tokens)}"
        )
    if tokens.shape[1] > max_len:
        raise ValueError(f"sequences of {tokens.shape[1]} tokens are longer than the model's max_len={max_len}")
    if not isinstance(tokens, jax.core.Tracer):
        values = np.asarray(tokens)
        if values.size and (values.min() < 0 or values.max() >= vocab_size):
            bad = values[(values < 0) | (values >= vocab_size)][0]
            raise ValueError(f"token id {bad} is outside [0, {vocab_size}) (vocab_size)")


class _LM(linen.Module):
    """The embedding and output projection shared by the two language models; subclasses give :meth:`hidden`."""

    vocab_size: int
    dim: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    max_len: int = 256
    scale: float = 0.5
    param_dtype: Any = jnp.float32

    def make_block(self) -> TransformerBlock:
        return TransformerBlock(self.dim, self.heads, self.mlp_ratio, self.scale, self.param_dtype, name="block")

    @linen.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        check_tokens(tokens, self.vocab_size, self.max_len)
        dtype = self.param_dtype
        unit = linen.initializers.normal(1 / math.sqrt(2))  # x = embedding + position: unit scale per entry
        embed = linen.Embed(
            self.vocab_size, self.dim, dtype=dtype, param_dtype=dtype, embedding_init=unit, name="embed"
        )
        position = self.param("position", unit, (self.max_len, self.dim), dtype)
        x = embed(tokens) + position[None, : tokens.shape[1]]
        z = self.hidden(x)
        z = linen.LayerNorm(dtype=dtype, param_dtype=dtype, name="norm_out")(z)
        return linen.Dense(self.vocab_size, dtype=dtype, param_dtype=dtype, name="head")(z)

    def hidden(self, x: jax.Array) -> jax.Array:
        """The final hidden state from the injection ``x``."""
        raise NotImplementedError


class DEQTransformerLM(_LM):
    """A DEQ-Transformer language model: ``logits = head(LN(z*))``, ``z* = f(z*, x)`` the equilibrium of one
    weight-tied :class:`TransformerBlock` (Bai, Kolter & Koltun 2019, arXiv 1909.01377).

    Attributes:
      vocab_size: the number of token ids.
      dim, heads, mlp_ratio: the block's width, attention heads and MLP expansion.
      max_len: the longest sequence (the size of the position embedding).
      scale: the gain at init of the block's attention output and second MLP layer.
      param_dtype: the parameters' and the computation's dtype.
      solver: the forward solver (default :data:`jdeq.models.ZOO_SOLVER`).
      grad: the gradient mode (default ``jdeq.Implicit()``).
      skip: start each solve from a learned SkipDEQ guess of the map's kind (:class:`~jdeq.models.mdeq.OwnKindGuess`:
        a :class:`TransformerBlock` with weights of its own, gain 1 at init, on ``stop_gradient(x)``; ``skip_depth``
        such blocks in a chain), trained by the consistency loss only, with weight ``skip_weight`` (see
        :class:`jdeq.nn.DEQ`).

    Call as ``model.apply(variables, tokens)`` with integer ``(B, T)`` tokens; returns ``(B, T, vocab_size)``
    logits, position ``t`` predicting token ``t + 1``. Forward statistics are sown like :class:`jdeq.nn.DEQ`'s.
    """

    solver: Solver = ZOO_SOLVER
    grad: Optional[GradientMode] = None
    skip: bool = False
    skip_weight: float = 1.0
    skip_depth: int = 1

    def hidden(self, x: jax.Array) -> jax.Array:
        options = {}
        if self.skip:
            block = TransformerBlock(self.dim, self.heads, self.mlp_ratio, 1.0, self.param_dtype, parent=None)
            options = dict(skip=OwnKindGuess(block, self.skip_depth, name="skip"), skip_weight=self.skip_weight)
        return DEQ(self.make_block(), solver=self.solver, grad=self.grad, name="deq", **options)(x, jnp.zeros_like(x))


class WeightTiedTransformerLM(_LM):
    """The explicit baseline of :class:`DEQTransformerLM`: the same block applied ``depth`` times from ``z = 0``
    (weight-tied, backpropagation through the layers); the same parameters.

    Attributes:
      depth: the number of applications of the block (its forward cost in block evaluations).
    """

    depth: int = 12

    def hidden(self, x: jax.Array) -> jax.Array:
        if not (isinstance(self.depth, int) and self.depth >= 1):
            raise ValueError(f"WeightTiedTransformerLM(depth=...) must be an int >= 1, got {self.depth!r}")
        block, z = self.make_block(), jnp.zeros_like(x)
        for _ in range(self.depth):
            z = block(z, x)
        return z


class TeacherForced(linen.Module):
    """A language model ``lm`` on windows of ``T + 1`` tokens: returns ``(lm(windows[:, :-1]), windows[:, 1:])``,
    the logits and their targets, for :func:`teacher_forced_loss` and :func:`bits_per_character` (the model
    :func:`jdeq.train.fit` trains on :meth:`jdeq.data.TextDataset.windows`)."""

    lm: linen.Module

    def __call__(self, windows: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.lm(windows[:, :-1]), windows[:, 1:]


def teacher_forced_loss(outputs: tuple[jax.Array, jax.Array], y: jax.Array) -> jax.Array:
    """The mean next-token cross-entropy (nats) of :class:`TeacherForced` ``outputs``; ``y`` (each window's last
    character, also its last target) is not needed."""
    logits, targets = outputs
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))


def bits_per_character(outputs: tuple[jax.Array, jax.Array], y: jax.Array) -> dict:
    """``{"bpc": cross-entropy / ln 2, "accuracy": next-character accuracy}`` of :class:`TeacherForced` outputs."""
    logits, targets = outputs
    predicted = jnp.argmax(logits, -1).astype(targets.dtype)
    return {
        "bpc": teacher_forced_loss(outputs, y) / jnp.log(2.0).astype(logits.dtype),
        "accuracy": jnp.mean((predicted == targets).astype(logits.dtype)),
    }
