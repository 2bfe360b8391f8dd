"""The five time parameterisations ("transports") of Transition Models.

A transport fixes the noising path ``x_t = alpha_t * x + sigma_t * z`` between data ``x`` (at
``t = T_min``) and Gaussian noise ``z`` (at ``t = T_max``), the network's time input
``c_noise(t)``, the training-time distribution ``sample_t``, the transition training target
``target`` (built from the total time derivative dF/dt of the network output) and the one-step
transition ``x_t -> x_r`` given the network output F (``transition``).

Numerics follow the official TiM code (WZDTHU/TiM, ``tim/schedulers/transports.py``), quirks
included (e.g. the EDM path uses ``alpha_t = 1 / sqrt(t^2 + sigma_d^2)`` and a ``sigma_d**3`` term
in its transition coefficients), so the official checkpoints and fixtures are reproduced.

Conventions:
  * ``t`` and ``r`` (``r <= t``) are scalars or shape ``(B,)``; they broadcast over the leading
    (batch) axis of ``x`` of any rank and layout (``expand_like``). Arrays already expanded to
    ``x.ndim`` are accepted too.
  * Everything is computed in the dtype of the inputs: float64 when jax x64 is enabled and the
    inputs are float64, float32 otherwise. Python-float constants never upcast.
  * Objects are small frozen dataclasses (hashable), usable as static ``jax.jit`` arguments.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Sequence, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Scalar = Union[float, Array]

__all__ = [
    "Transport",
    "OT_FM",
    "TrigFlow",
    "EDM",
    "VP_SDE",
    "VE_SDE",
    "TRANSPORTS",
    "make_transport",
    "expand_like",
]


def _as_float(t: Any) -> Array:
    """``t`` as a floating jax array (integers become float32, floats keep their dtype)."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    return t


def expand_like(t: Any, x: Array) -> Array:
    """Reshape a time ``t`` (scalar, ``(B,)`` or already ``x.ndim``-d) to broadcast against ``x``.

    ``(B,)`` becomes ``(B, 1, ..., 1)`` with ``x.ndim`` axes; scalars and arrays that already have
    ``x.ndim`` axes are returned unchanged.
    """
    t = _as_float(t)
    x_ndim = jnp.ndim(x)
    if t.ndim == 0 or t.ndim == x_ndim:
        return t
    if t.ndim == 1:
        return t.reshape(t.shape + (1,) * (x_ndim - 1))
    raise ValueError(
        f"time must be a scalar, shape (B,) or have x.ndim={x_ndim} axes; got shape {t.shape}"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transport:
    """Common interface, and the guidance fields and enhanced velocity shared by all transports.

    Guidance-enhanced target (the official ``enhance_target`` runs, e.g. C2I ``*_mg``): when
    ``enhance_target`` is on, inside the window ``w_start <= t <= w_end`` the ground-truth
    velocity of :meth:`target` becomes ``w_gt * v + w_cond * F_cond + (1 - w_gt - w_cond) *
    F_uncond`` (see :meth:`_enhanced`). These five fields are defined here once; every concrete
    transport (a frozen, keyword-only dataclass subclass) adds ``sigma_d`` and its own
    parameters, and has ``T_max`` (pure noise) and ``T_min`` (data) as fields or properties.
    """

    name: ClassVar[str] = "Transport"
    #: whether ``transition`` implements the stochasticity term (only OT-FM does, as officially)
    supports_stochasticity: ClassVar[bool] = False
    #: fields that must be > 0 (checked on construction)
    positive_fields: ClassVar[tuple[str, ...]] = ("sigma_d",)

    enhance_target: bool = False
    w_gt: float = 1.0
    w_cond: float = 0.0
    w_start: float = 0.0
    w_end: float = 1.0

    def __post_init__(self):
        if type(self) is Transport:
            raise TypeError("Transport is the common base; build OT_FM, TrigFlow, EDM, VP_SDE or "
                            "VE_SDE (or make_transport(name))")
        self._check_common()

    # --- interface --------------------------------------------------------------------------
    def interpolant(self, t: Scalar) -> tuple[Array, Array, Array, Array]:
        """``(alpha_t, sigma_t, d alpha/dt, d sigma/dt)``, elementwise in ``t`` (same shape as t)."""
        raise NotImplementedError

    def c_noise(self, t: Scalar) -> Array:
        """The network's time input for time ``t`` (elementwise, same shape and dtype as t)."""
        raise NotImplementedError

    def sample_t(self, rng: Array, shape: Union[int, Sequence[int]], dtype=jnp.float32) -> Array:
        """Draw training times of the given shape from the transport's training distribution."""
        raise NotImplementedError

    def target(self, x_t: Array, v_t: Array, x: Array, z: Array, t: Scalar, r: Scalar,
               dF_dt: Array, F_cond: Optional[Array] = None,
               F_uncond: Optional[Array] = None) -> Array:
        """Transition training target for F_theta(x_t, t, r), same shape as ``x_t``.

        Args:
          x_t, v_t: the interpolant and its time derivative at t, shape (B, ...).
          x, z: clean data and noise, shape (B, ...).
          t, r: times, scalar or (B,), r <= t.
          dF_dt: total derivative d F_theta(x_t, t, r) / dt along the path, shape (B, ...).
          F_cond, F_uncond: network outputs F(x_t, t, t) with the condition / the null
            condition (the EMA model officially). When ``enhance_target`` is on and either is
            given, the ground-truth velocity is replaced, inside the window
            ``w_start <= t <= w_end``, by ``w_gt * v + w_cond * F_cond + (1 - w_gt - w_cond) *
            F_uncond`` (a missing one counts as 0, as officially when ``w_cond == 0``).
        """
        raise NotImplementedError

    def transition(self, x_t: Array, t: Scalar, r: Scalar, F: Array, s_ratio: Scalar = 0.0,
                   noise: Optional[Array] = None) -> Array:
        """One transition step ``x_t -> x_r`` given the network output ``F`` (shape of ``x_t``).

        ``s_ratio`` (stochasticity ratio in [0, 1)) and ``noise`` (standard normal, shape of
        ``x_t``) are only supported by OT-FM; the other transports reject a nonzero ratio.
        """
        raise NotImplementedError

    # --- helpers ----------------------------------------------------------------------------
    def _enhanced(self, base: Array, t: Array, F_cond, F_uncond, sign: float = 1.0) -> Array:
        """Mix ``base`` with the (signed) guided network outputs inside the [w_start, w_end] window.

        Returns ``base`` unchanged when enhancement is off or no network output is given.
        """
        if not self.enhance_target or (F_cond is None and F_uncond is None):
            return base
        inside = (t >= self.w_start) & (t <= self.w_end)
        # The weights are float32 whatever the data dtype, as in the official code (torch.where on
        # Python scalars yields float32); in float64 this reproduces its numbers bit for bit.
        f32 = jnp.float32
        w_gt = jnp.where(inside, jnp.asarray(self.w_gt, f32), jnp.asarray(1.0, f32))
        w_cond = jnp.where(inside, jnp.asarray(self.w_cond, f32), jnp.asarray(0.0, f32))
        w_unc = jnp.asarray(1.0, f32) - w_gt - w_cond
        dtype = jnp.result_type(base.dtype, f32)
        w_gt, w_cond, w_unc = w_gt.astype(dtype), w_cond.astype(dtype), w_unc.astype(dtype)
        out = w_gt * base
        if F_cond is not None:
            out = out + w_cond * (sign * F_cond)
        if F_uncond is not None:
            out = out + w_unc * (sign * F_uncond)
        return out

    def _reject_stochasticity(self, s_ratio) -> None:
        if isinstance(s_ratio, (int, float)) and s_ratio == 0:
            return
        raise ValueError(
            f"stochasticity (s_ratio={s_ratio!r}) is only implemented for the OT_FM transport, "
            f"not {self.name}"
        )

    def _check_common(self) -> None:
        for field in self.positive_fields:
            if not getattr(self, field) > 0:
                raise ValueError(f"{self.name}: {field} must be > 0, got {getattr(self, field)}")
        if not self.T_max > self.T_min:
            raise ValueError(f"{self.name}: T_max must be > T_min, got T_max={self.T_max}, "
                             f"T_min={self.T_min}")
        if not self.w_start <= self.w_end:
            raise ValueError(f"{self.name}: w_start must be <= w_end, got {self.w_start} > "
                             f"{self.w_end}")


def _lognormal(rng, shape, dtype, P_mean, P_std) -> Array:
    """exp(N(P_mean, P_std^2)) samples, the log-normal noise level of EDM."""
    return jnp.exp(jax.random.normal(rng, shape, dtype) * P_std + P_mean)


def _shape(shape) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(shape)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OT_FM(Transport):
    """Linear flow matching (SiT): ``x_t = (1 - t) x + t z`` on t in [0, 1].

    Training times: ``t = s / (1 + s)`` with ``s`` log-normal(P_mean, P_std) (logit-normal t).
    F is the average velocity over [r, t]: ``x_r = x_t - (t - r) F``.
    """

    name: ClassVar[str] = "OT_FM"
    supports_stochasticity: ClassVar[bool] = True
    positive_fields: ClassVar[tuple[str, ...]] = ("sigma_d", "P_std")

    P_mean: float = 0.0
    P_std: float = 1.0
    sigma_d: float = 1.0
    T_max: float = 1.0
    T_min: float = 0.0

    def interpolant(self, t):
        t = _as_float(t)
        one = jnp.ones_like(t)
        return 1.0 - t, t, -one, one

    def c_noise(self, t):
        return _as_float(t)

    def sample_t(self, rng, shape, dtype=jnp.float32):
        s = _lognormal(rng, _shape(shape), dtype, self.P_mean, self.P_std)
        return s / (1.0 + s)

    def target(self, x_t, v_t, x, z, t, r, dF_dt, F_cond=None, F_uncond=None):
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        v = self._enhanced(v_t, t, F_cond, F_uncond)
        return v - (t - r) * dF_dt

    def transition(self, x_t, t, r, F, s_ratio=0.0, noise=None):
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        dt = t - r
        x_r = x_t - dt * F
        if isinstance(s_ratio, (int, float)) and s_ratio == 0:
            return x_r
        if noise is None:
            raise ValueError("OT_FM.transition: `noise` (standard normal like x_t) is required "
                             "when s_ratio may be nonzero")
        s = jnp.asarray(s_ratio, x_r.dtype)
        # the noise estimate implied by F: z_hat = x_t + (1 - t) F (exact for the OT path)
        z_hat = x_t + (1.0 - t) * F
        return x_r - s * z_hat * dt + jnp.sqrt(2.0 * s * t * dt) * noise


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrigFlow(Transport):
    """TrigFlow (sCM): ``x_t = cos(t) x + sin(t) z`` on t in [0, pi/2].

    Training times: ``t = arctan(s)`` with ``s`` log-normal(P_mean, P_std).
    ``x_r = cos(t - r) x_t - sin(t - r) F``.
    """

    name: ClassVar[str] = "TrigFlow"
    positive_fields: ClassVar[tuple[str, ...]] = ("sigma_d", "P_std")

    P_mean: float = -1.0
    P_std: float = 1.6
    sigma_d: float = 0.5
    T_max: float = 1.57
    T_min: float = 0.0

    def interpolant(self, t):
        t = _as_float(t)
        c, s = jnp.cos(t), jnp.sin(t)
        return c, s, -s, c

    def c_noise(self, t):
        return _as_float(t)

    def sample_t(self, rng, shape, dtype=jnp.float32):
        return jnp.arctan(_lognormal(rng, _shape(shape), dtype, self.P_mean, self.P_std))

    def target(self, x_t, v_t, x, z, t, r, dF_dt, F_cond=None, F_uncond=None):
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        v = self._enhanced(v_t, t, F_cond, F_uncond)
        return v - jnp.tan(t - r) * (x_t + dF_dt)

    def transition(self, x_t, t, r, F, s_ratio=0.0, noise=None):
        self._reject_stochasticity(s_ratio)
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        return jnp.cos(t - r) * x_t - jnp.sin(t - r) * F


@dataclasses.dataclass(frozen=True, kw_only=True)
class EDM(Transport):
    """EDM (Karras et al.) in TiM's normalisation: ``alpha_t = 1 / sqrt(t^2 + sigma_d^2)``,
    ``sigma_t = t / sqrt(t^2 + sigma_d^2)`` on t (the EDM noise level) in [T_min, T_max].

    Training times: t log-normal(P_mean, P_std). ``c_noise(t) = log(t) / 4``.
    """

    name: ClassVar[str] = "EDM"
    positive_fields: ClassVar[tuple[str, ...]] = ("sigma_d", "P_std", "T_min")  # c_noise: log(t)

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_d: float = 0.5
    T_max: float = 80.0
    T_min: float = 0.01

    def interpolant(self, t):
        t = _as_float(t)
        q = t * t + self.sigma_d**2
        rq = jnp.sqrt(q)
        q15 = q * rq
        return 1.0 / rq, t / rq, -t / q15, self.sigma_d**2 / q15

    def c_noise(self, t):
        return jnp.log(_as_float(t)) * 0.25

    def sample_t(self, rng, shape, dtype=jnp.float32):
        return _lognormal(rng, _shape(shape), dtype, self.P_mean, self.P_std)

    def target(self, x_t, v_t, x, z, t, r, dF_dt, F_cond=None, F_uncond=None):
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        sd = self.sigma_d
        q = t * t + sd**2           # t^2 + sigma_d^2
        p = t * t + sd**3           # t^2 + sigma_d^3 (official coefficient)
        rq = jnp.sqrt(q)
        q15 = q * rq
        # the diffusion ("x-hat") target and its time derivative coefficients
        a_hat = t / (sd * rq)
        s_hat = -sd / rq
        da_hat = sd / q15           # = -t^2 / (sd q^1.5) + 1 / (sd q^0.5)
        ds_hat = sd * t / q15
        diffusion_target = self._enhanced(a_hat * x + s_hat * z, t, F_cond, F_uncond)
        d = t - r
        coef = d * q * p / (q * p - t * d * (2.0 * q - p))
        return diffusion_target + coef * (da_hat * x + ds_hat * z - dF_dt)

    def transition(self, x_t, t, r, F, s_ratio=0.0, noise=None):
        self._reject_stochasticity(s_ratio)
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        sd = self.sigma_d
        ratio = jnp.sqrt(t * t + sd**2) / jnp.sqrt(r * r + sd**2) / (t * t + sd**3)
        return (sd**3 + t * r) * ratio * x_t + sd**2 * (t - r) * ratio * F


@dataclasses.dataclass(frozen=True, kw_only=True)
class VP_SDE(Transport):
    """Variance-preserving SDE (Song et al.) with linear beta: ``beta(t)^2 = exp(beta_d t^2 / 2 +
    beta_min t) - 1``, ``alpha_t = 1 / sqrt(beta^2 + 1)``, ``sigma_t = beta alpha_t``, t in
    [epsilon_t, 1]. Training times uniform on [epsilon_t, 1]; ``c_noise(t) = (T - 1) t``.
    """

    name: ClassVar[str] = "VP_SDE"

    beta_min: float = 0.1
    beta_d: float = 19.9
    epsilon_t: float = 1e-5
    T: int = 1000
    sigma_d: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.epsilon_t < 1:
            raise ValueError(f"VP_SDE: epsilon_t must be in (0, 1), got {self.epsilon_t}")

    @property
    def T_max(self) -> float:
        return 1.0

    @property
    def T_min(self) -> float:
        return self.epsilon_t

    def beta(self, t) -> Array:
        """The VP noise-to-signal ratio sigma_t / alpha_t (expm1 keeps small t accurate)."""
        t = _as_float(t)
        return jnp.sqrt(jnp.expm1(0.5 * self.beta_d * t * t + self.beta_min * t))

    def interpolant(self, t):
        t = _as_float(t)
        b = self.beta(t)
        n = jnp.sqrt(b * b + 1.0)
        g = 0.5 * (self.beta_d * t + self.beta_min)
        return 1.0 / n, b / n, -g / n, g / (b * n)

    def c_noise(self, t):
        return (self.T - 1) * _as_float(t)

    def sample_t(self, rng, shape, dtype=jnp.float32):
        u = jax.random.uniform(rng, _shape(shape), dtype)
        return 1.0 + u * (self.epsilon_t - 1.0)

    def target(self, x_t, v_t, x, z, t, r, dF_dt, F_cond=None, F_uncond=None):
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        z = self._enhanced(z, t, F_cond, F_uncond)
        b_t, b_r = self.beta(t), self.beta(r)
        d_beta_t = (self.beta_d * t + self.beta_min) * (b_t * b_t + 1.0) / (2.0 * b_t)
        return z - dF_dt * (b_t - b_r) / d_beta_t

    def transition(self, x_t, t, r, F, s_ratio=0.0, noise=None):
        self._reject_stochasticity(s_ratio)
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        b_t, b_r = self.beta(t), self.beta(r)
        n_r = jnp.sqrt(b_r * b_r + 1.0)
        return jnp.sqrt(b_t * b_t + 1.0) / n_r * x_t + (b_r - b_t) / n_r * F


@dataclasses.dataclass(frozen=True, kw_only=True)
class VE_SDE(Transport):
    """Variance-exploding SDE (Song et al.): ``x_t = x + t z`` on t in [sigma_min, sigma_max].

    Training times log-uniform on [sigma_min, sigma_max]; ``c_noise(t) = log(t / 2)``.
    F predicts the negated velocity: ``x_r = x_t + (t - r) F``.
    """

    name: ClassVar[str] = "VE_SDE"
    positive_fields: ClassVar[tuple[str, ...]] = ("sigma_d", "sigma_min")

    sigma_min: float = 0.02
    sigma_max: float = 100.0
    sigma_d: float = 1.0

    @property
    def T_max(self) -> float:
        return self.sigma_max

    @property
    def T_min(self) -> float:
        return self.sigma_min

    def interpolant(self, t):
        t = _as_float(t)
        return jnp.ones_like(t), t, jnp.zeros_like(t), jnp.ones_like(t)

    def c_noise(self, t):
        return jnp.log(0.5 * _as_float(t))

    def sample_t(self, rng, shape, dtype=jnp.float32):
        u = jax.random.uniform(rng, _shape(shape), dtype)
        return self.sigma_min * jnp.exp(u * math.log(self.sigma_max / self.sigma_min))

    def target(self, x_t, v_t, x, z, t, r, dF_dt, F_cond=None, F_uncond=None):
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        z = self._enhanced(z, t, F_cond, F_uncond, sign=-1.0)
        return (r - t) * dF_dt - z

    def transition(self, x_t, t, r, F, s_ratio=0.0, noise=None):
        self._reject_stochasticity(s_ratio)
        t, r = expand_like(t, x_t), expand_like(r, x_t)
        return x_t + (t - r) * F


TRANSPORTS: dict[str, type] = {
    cls.name: cls for cls in (OT_FM, TrigFlow, EDM, VP_SDE, VE_SDE)
}


def make_transport(name: str, **overrides) -> Transport:
    """Build a transport by its official name with constructor overrides (official field names).

    >>> make_transport("OT_FM", P_mean=-0.4)
    Raises ValueError for an unknown name or an override that is not a field of that transport
    (T_max / T_min of VP_SDE and VE_SDE are derived from epsilon_t / sigma_min, sigma_max).
    """
    cls = TRANSPORTS.get(name)
    if cls is None:
        folded = {k.lower(): v for k, v in TRANSPORTS.items()}
        cls = folded.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown transport {name!r}; allowed: {sorted(TRANSPORTS)}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown {cls.name} field(s) {unknown}; allowed: {fields}"
        )
    return cls(**overrides)
