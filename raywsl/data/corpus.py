"""A procedural corpus of categorised, watertight triangle meshes.

Real datasets (ShapeNet) are not always at hand, so tests, the quickstart and scale studies (20 to
10^5+ shapes) use this generator. Every category is an analytic signed distance function (smooth
unions / differences of ellipsoids, capsules, boxes, tori, cylinders and cones) whose continuous
parameters are drawn per shape; the SDF is sampled on a grid and meshed with marching cubes at level
0. The grid always ends outside the shape, so each surface is closed: watertight by construction,
outward-facing, with the genus and number of connected components below.

| category     | genus | components | structure                                                  |
|--------------|-------|------------|------------------------------------------------------------|
| blob         | 0     | 1          | sphere with smooth radial noise (star-shaped)              |
| torus        | 1     | 1          | ring in the XZ plane, elliptic tube                        |
| double_torus | 2     | 1          | two fused rings side by side                               |
| capsule      | 0     | 1          | tapered capsule, near-vertical                             |
| rounded_box  | 0     | 1          | box with rounded edges                                     |
| mug          | 1     | 1          | hollow cylinder open at the top, with a ring handle        |
| chair        | 0     | 1          | seat, four legs, (tilted) back plate                       |
| table        | 0     | 1          | top and four legs                                          |
| airplane     | 0     | 1          | fuselage, swept wings, tail fin and stabiliser             |
| lamp         | 0     | 1          | base disk, pole, hollow shade open at the bottom           |
| pebbles      | 0     | 3          | three separate ellipsoids around the Y axis                |
| bracket ¹    | 0-4 ² | 1          | plate with bolt holes; most an L-bracket: upright flange,  |
|              |       |            | concave fillet, 0-2 triangular gussets; rounded edges      |

¹ opt-in: the default selection (categories=None, DEFAULT_CATEGORIES) is the first eleven, so
default corpora stay as they were; a bracket is generated only when named, e.g.
`write_corpus(out, n, categories=["bracket"])` or `raywsl corpus OUT --n N --categories bracket`.
² per shape: the number of through-holes, recorded as "genus" in the shape's params (the
manifest's params column); `CATEGORIES[name].genus_of(params)` reads any category's genus.

Conventions: +Y is up (as in ShapeNet); shapes lie roughly in the unit sphere; the only random pose
change is a yaw about +Y of at most ±30°, so category identity and the up axis survive. Shape i is a
pure function of (seed, i, categories as a set, resolution): its parameters come from
`np.random.default_rng([seed, i])` and its category is round-robin over the selected categories in
registry order, so classes are balanced and shape i does not depend on n, on the order the
categories are listed in, or on how generation is parallelised.

`resolution` is the number of grid cells across [-1, 1] (cell size 2 / resolution); the grid itself
only covers the shape's bounding box. The documented topology holds from the default resolution up:
every thin part is at least two default cells thick and every hole or gap about three cells wide or
more. At 64 a shape has roughly 3-20k faces and takes ~12 ms to generate on one CPU core.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import fsspec
import numpy as np
import trimesh
from skimage.measure import marching_cubes

from raywsl import cache
from raywsl import contract as C

DEFAULT_RESOLUTION = 64
MAX_YAW = math.pi / 6
MANIFEST_COLUMNS = ("id", "path", "category", "params")

# A SDF takes broadcastable coordinate arrays (x along axis 0, y along 1, z along 2) and returns
# values of their broadcast shape: primitives that depend on one or two axes stay 1-D / 2-D, which
# makes the grid evaluation several times cheaper than on a flat (N, 3) point list.
Sdf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# --- SDF primitives (exact or Lipschitz-bounded; only their zero sets have to be exact) -----------


def _length(*cs: np.ndarray) -> np.ndarray:
    return np.sqrt(sum(c * c for c in cs))


def _ellipsoid(x, y, z, c, radii):
    # Scaled sphere: exact zero set, and 1-Lipschitz (never overstates the distance).
    k = _length((x - c[0]) / radii[0], (y - c[1]) / radii[1], (z - c[2]) / radii[2])
    return (k - 1.0) * min(radii)


def _combine2(a, b):
    """Distance to a 2-D box from the per-axis signed offsets (used by boxes, cylinders, cones)."""
    return _length(np.maximum(a, 0), np.maximum(b, 0)) + np.minimum(np.maximum(a, b), 0)


def _box(x, y, z, c, half, rounding=0.0):
    qx, qy, qz = (np.abs(v - c[i]) - half[i] + rounding for i, v in enumerate((x, y, z)))
    outside = _length(np.maximum(qx, 0), np.maximum(qy, 0), np.maximum(qz, 0))
    return outside + np.minimum(np.maximum(qx, np.maximum(qy, qz)), 0) - rounding


def _cylinder_y(x, y, z, c, r, half_h, rounding=0.0):
    radial = _length(x - c[0], z - c[2]) - r + rounding
    return _combine2(radial, np.abs(y - c[1]) - half_h + rounding) - rounding


def _frustum_y(x, y, z, c, y0, y1, r0, r1):
    """Vertical cone frustum about (c[0], c[2]): radius r0 at height y0, r1 at y1 (y0 < y1)."""
    t = np.clip((y - y0) / (y1 - y0), 0.0, 1.0)
    radial = _length(x - c[0], z - c[2]) - (r0 + t * (r1 - r0))
    return _combine2(radial, np.abs(y - 0.5 * (y0 + y1)) - 0.5 * (y1 - y0))


def _torus(x, y, z, c, major, minor, axis="y", squash=1.0):
    """Ring of radius `major` around `axis` through c; tube radius `minor`, stretched by `squash`
    along the axis."""
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    ring, along = (_length(dx, dz), dy) if axis == "y" else (_length(dx, dy), dz)
    return (_length(ring - major, along / squash) - minor) * min(1.0, squash)


def _tapered_capsule(x, y, z, a, b, ra, rb):
    a, b = np.asarray(a), np.asarray(b)
    ba = b - a
    px, py, pz = x - a[0], y - a[1], z - a[2]
    t = np.clip((px * ba[0] + py * ba[1] + pz * ba[2]) / ba.dot(ba), 0.0, 1.0)
    return _length(px - t * ba[0], py - t * ba[1], pz - t * ba[2]) - (ra + t * (rb - ra))


def _smin(a, b, k):
    """Polynomial smooth union: fillets of size ~k where the parts meet."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + h * (a - b) - k * h * (1.0 - h)


def _smax(a, b, k):
    """Polynomial smooth intersection (max(a, b) with edges rounded by ~k); smooth cuts are
    _smax(body, -tool, k)."""
    return -_smin(-a, -b, k)


def _smin_all(parts, k):
    out = parts[0]
    for p in parts[1:]:
        out = _smin(out, p, k)
    return out


# --- categories ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeDef:
    """What a category generator returns: the parameters it drew and the SDF they define."""

    params: dict
    sdf: Sdf


@dataclass(frozen=True)
class Category:
    """A registry entry: call it with a Generator to draw a shape. `genus` and `components` are the
    topology every shape of the category has (per the module table); genus None means it varies per
    shape and the shape's params record it as "genus" (read either way with `genus_of`). An `opt_in`
    category is generated only when named: it is not in the default selection."""

    generate: Callable[[np.random.Generator], ShapeDef]
    genus: int | None
    components: int = 1
    opt_in: bool = False

    def __call__(self, rng: np.random.Generator) -> ShapeDef:
        return self.generate(rng)

    def genus_of(self, params: dict) -> int:
        """The documented genus of the shape drawn with `params` (a CorpusShape's or a manifest
        row's json-decoded params)."""
        return self.genus if self.genus is not None else int(params["genus"])


def _blob(rng):
    k = 6
    radius = rng.uniform(0.55, 0.7)
    dirs = rng.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freqs, phases, amps = rng.uniform(1.5, 4.5, k), rng.uniform(0, 2 * np.pi, k), rng.uniform(0.03, 0.06, k)

    def sdf(x, y, z):
        d = _length(x, y, z) + 1e-9
        r = np.ones_like(d)
        for di, f, ph, a in zip(dirs, freqs, phases, amps):
            r += a * np.sin(f * (x * di[0] + y * di[1] + z * di[2]) / d + ph)
        return d - radius * r  # r ≥ 0.64 everywhere: star-shaped, hence genus 0

    return ShapeDef(dict(radius=radius, dirs=dirs, freqs=freqs, phases=phases, amps=amps), sdf)


def _torus_cat(rng):
    major = rng.uniform(0.5, 0.68)
    minor = rng.uniform(0.13, min(0.26, major - 0.25))  # hole ≥ 0.5 wide
    squash = rng.uniform(0.75, 1.25)
    return ShapeDef(
        dict(major=major, minor=minor, squash=squash),
        lambda x, y, z: _torus(x, y, z, (0, 0, 0), major, minor, squash=squash),
    )


def _double_torus(rng):
    major, minor = rng.uniform(0.3, 0.37), rng.uniform(0.1, 0.14)
    # Ring centres at ±(major + spread·minor): spread ≥ 0 keeps the rings from crossing (crossing
    # rings would enclose a third hole), spread < 1 keeps the tubes fused.
    spread = rng.uniform(0.0, 0.6)
    cx = major + spread * minor
    return ShapeDef(
        dict(major=major, minor=minor, spread=spread),
        lambda x, y, z: _smin(
            _torus(x, y, z, (-cx, 0, 0), major, minor), _torus(x, y, z, (cx, 0, 0), major, minor), 0.05
        ),
    )


def _capsule(rng):
    length, r_bottom = rng.uniform(0.7, 1.2), rng.uniform(0.16, 0.3)
    r_top = r_bottom * rng.uniform(0.6, 1.0)
    tilt = rng.uniform(-0.3, 0.3)
    half = 0.5 * length * np.array([np.sin(tilt), np.cos(tilt), 0.0])
    return ShapeDef(
        dict(length=length, r_bottom=r_bottom, r_top=r_top, tilt=tilt),
        lambda x, y, z: _tapered_capsule(x, y, z, -half, half, r_bottom, r_top),
    )


def _rounded_box(rng):
    half = rng.uniform(0.25, 0.5, 3)
    rounding = rng.uniform(0.03, 0.12)
    return ShapeDef(
        dict(half=half, rounding=rounding), lambda x, y, z: _box(x, y, z, (0, 0, 0), half, rounding)
    )


def _mug(rng):
    radius, height = rng.uniform(0.28, 0.4), rng.uniform(0.6, 0.9)
    wall, base = rng.uniform(0.07, 0.09), rng.uniform(0.07, 0.1)
    tube = rng.uniform(0.045, 0.06)
    ring = rng.uniform(0.15, 0.4 * height - tube)  # handle stays within the body's height
    handle_y = rng.uniform(-0.05, 0.05) * height
    shift = 0.5 * (ring + tube)  # centre the mug+handle bounding box on the origin
    inner = radius - wall

    def sdf(x, y, z):
        x = x + shift
        body = _cylinder_y(x, y, z, (0, 0, 0), radius, 0.5 * height, rounding=0.03)
        # The handle ring is centred on the wall: its inner half is buried in the wall or cut away
        # with the cavity, its outer half leaves a hole ≥ 0.09 wide next to the wall (genus 1).
        handle = _torus(x, y, z, (radius, handle_y, 0), ring, tube, axis="z")
        cavity = _cylinder_y(x, y, z, (0, base, 0), inner, 0.5 * height, rounding=0.02)
        return np.maximum(_smin(body, handle, 0.03), -cavity)

    return ShapeDef(
        dict(
            radius=radius, height=height, wall=wall, base=base,
            handle_ring=ring, handle_tube=tube, handle_y=handle_y,
        ),
        sdf,
    )


def _legs(x, y, z, half_w, half_d, inset, leg, y_bottom, y_top):
    """Four vertical square legs with their outer faces `inset` from a (2·half_w × 2·half_d) top."""
    lx, lz, mid = half_w - inset - leg, half_d - inset - leg, 0.5 * (y_bottom + y_top)
    # Symmetric about x = 0 and z = 0: one rounded box evaluated at (|x|, |z|) is all four legs.
    return _box(np.abs(x), y, np.abs(z), (lx, mid, lz), (leg, 0.5 * (y_top - y_bottom), leg), 0.015)


def _chair(rng):
    half_w, half_d = rng.uniform(0.28, 0.38), rng.uniform(0.26, 0.36)
    seat_t, leg_h = rng.uniform(0.06, 0.1), rng.uniform(0.45, 0.65)
    leg, inset = rng.uniform(0.035, 0.055), rng.uniform(0.0, 0.06)
    back_h, back_t, back_tilt = rng.uniform(0.4, 0.65), rng.uniform(0.065, 0.09), rng.uniform(0.0, 0.2)
    y0 = -0.5 * (leg_h + seat_t + back_h)
    seat_y = y0 + leg_h  # underside of the seat

    def sdf(x, y, z):
        seat = _box(x, y, z, (0, seat_y + 0.5 * seat_t, 0), (half_w, 0.5 * seat_t, half_d), 0.02)
        legs = _legs(x, y, z, half_w, half_d, inset, leg, y0, seat_y + 0.5 * seat_t)
        # Tilt the back by shearing z with height above the seat.
        zb = z + np.tan(back_tilt) * np.maximum(y - seat_y, 0.0)
        back_c = (0, seat_y + 0.5 * (seat_t + back_h), -half_d + 0.5 * back_t)
        back = _box(x, y, zb, back_c, (half_w, 0.5 * (seat_t + back_h), 0.5 * back_t), 0.02)
        return _smin_all([seat, legs, back], 0.02)

    return ShapeDef(
        dict(
            half_width=half_w, half_depth=half_d, seat_thickness=seat_t, leg_height=leg_h, leg=leg,
            inset=inset, back_height=back_h, back_thickness=back_t, back_tilt=back_tilt,
        ),
        sdf,
    )


def _table(rng):
    half_w, half_d = rng.uniform(0.55, 0.72), rng.uniform(0.3, 0.48)
    top_t, leg_h = rng.uniform(0.065, 0.09), rng.uniform(0.4, 0.65)
    leg, inset = rng.uniform(0.035, 0.06), rng.uniform(0.02, 0.12)
    y0 = -0.5 * (leg_h + top_t)
    top_y = y0 + leg_h + 0.5 * top_t

    def sdf(x, y, z):
        top = _box(x, y, z, (0, top_y, 0), (half_w, 0.5 * top_t, half_d), 0.02)
        return _smin(top, _legs(x, y, z, half_w, half_d, inset, leg, y0, top_y), 0.02)

    return ShapeDef(
        dict(
            half_width=half_w, half_depth=half_d, top_thickness=top_t, leg_height=leg_h, leg=leg, inset=inset
        ),
        sdf,
    )


def _airplane(rng):
    fl, fr = rng.uniform(0.65, 0.82), rng.uniform(0.07, 0.11)  # fuselage half-length, radius
    span, chord, thick = rng.uniform(0.55, 0.8), rng.uniform(0.18, 0.32), rng.uniform(0.065, 0.08)
    wing_x, sweep = rng.uniform(-0.15, 0.1), rng.uniform(0.0, 0.5)
    fin_h, tail_span = rng.uniform(0.15, 0.28), rng.uniform(0.16, 0.3)
    tail_chord = 0.6 * chord
    tail_x = -fl + fr + 0.5 * tail_chord

    def sdf(x, y, z):
        body = _tapered_capsule(x, y, z, (-fl + fr, 0, 0), (fl - fr, 0, 0), 0.6 * fr, fr)
        # Sweep: shift the wing section back in proportion to the distance from the centre line.
        xs = x + sweep * np.abs(z)
        wings = _box(xs, y, z, (wing_x, 0, 0), (0.5 * chord, 0.5 * thick, span), 0.025)
        stab = _box(xs, y, z, (tail_x, 0, 0), (0.5 * tail_chord, 0.5 * thick, tail_span), 0.025)
        fin_c = (tail_x, 0.5 * (fin_h + fr), 0)
        fin_half = (0.5 * tail_chord, 0.5 * (fin_h + fr), 0.5 * thick)
        fin = _box(x + sweep * np.maximum(y, 0), y, z, fin_c, fin_half, 0.025)
        return _smin_all([body, wings, stab, fin], 0.03)

    return ShapeDef(
        dict(
            fuselage_half_length=fl, fuselage_radius=fr, span=span, chord=chord, thickness=thick,
            wing_x=wing_x, sweep=sweep, fin_height=fin_h, tail_span=tail_span,
        ),
        sdf,
    )


def _lamp(rng):
    base_r, base_h = rng.uniform(0.22, 0.35), rng.uniform(0.065, 0.1)
    pole_r, pole_h = rng.uniform(0.04, 0.055), rng.uniform(0.8, 1.2)
    shade_bottom, shade_h, wall = rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.4), rng.uniform(0.065, 0.08)
    shade_top = shade_bottom * rng.uniform(0.4, 0.8)
    y0 = -0.5 * (base_h + pole_h)
    top = y0 + base_h + pole_h
    y_low = top - shade_h

    def sdf(x, y, z):
        base = _cylinder_y(x, y, z, (0, y0 + 0.5 * base_h, 0), base_r, 0.5 * base_h, rounding=0.02)
        pole = _cylinder_y(x, y, z, (0, 0.5 * (y0 + top), 0), pole_r, 0.5 * (top - y0) - wall)
        shade = _frustum_y(x, y, z, (0, 0, 0), y_low, top, shade_bottom, shade_top)
        # The hollow continues the outer cone's slope below its rim so the opening is clean.
        slope = (shade_top - shade_bottom) / shade_h
        hollow = _frustum_y(
            x, y, z, (0, 0, 0), y_low - 0.1, top - wall, shade_bottom - wall - 0.1 * slope, shade_top - wall
        )
        return _smin(_smin(base, pole, 0.03), np.maximum(shade, -hollow), 0.02)

    return ShapeDef(
        dict(
            base_radius=base_r, base_height=base_h, pole_radius=pole_r, pole_height=pole_h,
            shade_bottom=shade_bottom, shade_top=shade_top, shade_height=shade_h, shade_wall=wall,
        ),
        sdf,
    )


def _pebbles(rng):
    # Three ellipsoids of radii ≤ 0.26 at angles ≥ 86° apart on a ring of radius ≥ 0.45: centre
    # distance ≥ 0.61, so gaps ≥ 0.09 and the parts never touch.
    angles = 2 * np.pi * np.arange(3) / 3 + rng.uniform(-0.3, 0.3, 3)
    ring = rng.uniform(0.45, 0.6)
    centres = np.stack([ring * np.cos(angles), rng.uniform(-0.25, 0.25, 3), ring * np.sin(angles)], axis=1)
    radii = rng.uniform(0.14, 0.26, (3, 3))

    def sdf(x, y, z):
        return np.minimum.reduce([_ellipsoid(x, y, z, c, r) for c, r in zip(centres, radii)])

    return ShapeDef(dict(centres=centres, radii=radii), sdf)


# Bracket layout margins: every ligament (hole to plate edge, hole to rib or fillet) is at least
# GAP = 2.6 default cells wide and every hole at least 3.5 cells across, so the holes (the genus)
# survive meshing at the default resolution.
_GAP = 0.08


def _pair_x(rng, r, inner, outer):
    """x > 0 of a hole pair at ±x of radius r, clear of |x| < inner (a centre rib or the other hole:
    inner = 0 keeps the holes 2·_GAP apart) and of |x| > outer (the plate's end or an end rib)."""
    lo, hi = inner + r + _GAP, outer - r - _GAP
    assert lo <= hi, f"no room for a hole pair: x in [{lo}, {hi}]"  # _bracket's ranges guarantee room
    return rng.uniform(lo, hi)


def _bracket(rng):
    """A plate with bolt holes; for most shapes an L-bracket: an upright flange at the plate's back
    edge, a concave fillet in the inner corner and 0-2 triangular gussets. The base plate spans
    x ∈ [-W, W], z ∈ [-D, D]; the flange stands on its back edge z ∈ [-D, -D + t_f]. Every hole is
    a through-hole clear of the edges, the other holes, the ribs and the fillet, so the genus is
    the number of holes (params["genus"])."""
    half_w, half_d = rng.uniform(0.5, 0.7), rng.uniform(0.32, 0.45)
    base_t, rounding = rng.uniform(0.07, 0.1), rng.uniform(0.015, 0.03)
    r_base, r_flange = rng.uniform(0.055, 0.08, 2)  # hole diameters ≥ 3.5 default cells
    flanged = bool(rng.uniform() < 0.7)
    if flanged:
        height, flange_t = rng.uniform(0.5, 0.7), rng.uniform(0.07, 0.1)
        fillet = rng.uniform(0.03, 0.08)
        n_ribs = int(rng.integers(0, 3))
        rib_t, rib_inset = rng.uniform(0.07, 0.09), rng.uniform(0.0, 0.06)
        # Rib legs along the plate (z) and up the flange (y); the plate leg leaves room for a row
        # of base holes behind it, so base holes never meet a rib.
        rib_z = rng.uniform(0.12, min(0.3, 2 * half_d - flange_t - 2 * _GAP - 2 * r_base))
        rib_y = rng.uniform(0.12, 0.8 * (height - base_t))
        n_base, n_flange = (int(n) for n in rng.integers(0, 3, 2))
    else:
        # A flat mounting plate: up to four holes, nothing upright.
        height, flange_t, fillet, n_ribs, rib_t, rib_inset, rib_z, rib_y = base_t, 0.0, 0.0, 0, 0.0, 0.0, 0.0, 0.0
        n_base, n_flange = int(rng.integers(0, 5)), 0
    y0 = -0.5 * height  # the bounding box is centred on the origin
    zc, yc = -half_d + flange_t, y0 + base_t  # the inner corner between plate and flange

    # Ribs: one in the middle, or two near the ends.
    end = half_w - 0.5 * rib_t - rib_inset
    rib_x = [[], [0.0], [-end, end]][n_ribs]

    # Base holes (x, z, r): a row behind the fillet and ribs on an L-bracket, a centred pattern of up
    # to four on a flat plate.
    base_holes = []
    if flanged:
        z_row = rng.uniform(zc + max(fillet, rib_z if n_ribs else 0.0) + _GAP + r_base, half_d - _GAP - r_base)
        if n_base == 1:
            base_holes = [(0.0, z_row, r_base)]
        elif n_base == 2:
            x = _pair_x(rng, r_base, 0.0, half_w)
            base_holes = [(-x, z_row, r_base), (x, z_row, r_base)]
    elif n_base:
        xh = _pair_x(rng, r_base, 0.0, half_w)
        zh = _pair_x(rng, r_base, 0.0, half_d)
        base_holes = {
            1: [(0.0, 0.0)], 2: [(-xh, 0.0), (xh, 0.0)], 3: [(-xh, -zh), (xh, -zh), (0.0, zh)],
            4: [(-xh, -zh), (xh, -zh), (-xh, zh), (xh, zh)],
        }[n_base]
        base_holes = [(x, z, r_base) for x, z in base_holes]

    # Flange holes (x, y, r): a row above the fillet, beside the ribs.
    flange_holes = []
    if n_flange:
        y_row = rng.uniform(yc + fillet + _GAP + r_flange, y0 + height - _GAP - r_flange)
        if n_ribs == 1:  # beside the centre rib: one side or both
            x = _pair_x(rng, r_flange, 0.5 * rib_t, half_w)
            xs = [x, -x] if n_flange == 2 else [x * (1 if rng.uniform() < 0.5 else -1)]
        else:  # between the end ribs (or the plate's ends)
            outer = half_w - rib_t - rib_inset if n_ribs == 2 else half_w
            x = _pair_x(rng, r_flange, 0.0, outer) if n_flange == 2 else 0.0
            xs = [-x, x] if n_flange == 2 else [0.0]
        flange_holes = [(x, y_row, r_flange) for x in xs]

    def sdf(x, y, z):
        body = _box(x, y, z, (0, y0 + 0.5 * base_t, 0), (half_w, 0.5 * base_t, half_d), rounding)
        if flanged:
            flange = _box(x, y, z, (0, 0, -half_d + 0.5 * flange_t), (half_w, 0.5 * height, 0.5 * flange_t), rounding)
            # Concave fillet: the corner square [0, f]² (reaching into both plates) less the disc of
            # radius f tangent to both inner faces, along the plate's width.
            u, v = z - zc, y - yc
            h = 0.5 * (fillet + 0.5 * min(base_t, flange_t))  # half side of the square
            square = _combine2(np.abs(u - fillet + h) - h, np.abs(v - fillet + h) - h)
            corner = np.maximum(square, fillet - _length(u - fillet, v - fillet))
            body = np.minimum(np.minimum(body, flange), np.maximum(corner, np.abs(x) - half_w + rounding))
            # Gussets: right triangles with legs rib_z along the plate and rib_y up the flange
            # (reaching into both), fused with a small fillet.
            hyp = (u / rib_z + v / rib_y - 1) / math.hypot(1 / rib_z, 1 / rib_y)
            triangle = np.maximum(np.maximum(-u - 0.5 * flange_t, -v - 0.5 * base_t), hyp)
            for xr in rib_x:
                body = _smin(body, np.maximum(triangle, np.abs(x - xr) - 0.5 * rib_t), 0.02)
        for hx, hz, r in base_holes:
            body = _smax(body, r - _length(x - hx, z - hz), 0.015)
        for hx, hy, r in flange_holes:
            body = _smax(body, r - _length(x - hx, y - hy), 0.015)
        return body

    return ShapeDef(
        dict(
            genus=len(base_holes) + len(flange_holes), flanged=int(flanged), half_width=half_w, half_depth=half_d,
            base_thickness=base_t, height=height, flange_thickness=flange_t, rounding=rounding, fillet=fillet,
            ribs=n_ribs, rib_thickness=rib_t, rib_x=rib_x, rib_z=rib_z, rib_y=rib_y,
            base_holes=base_holes, flange_holes=flange_holes,
        ),
        sdf,
    )


CATEGORIES: dict[str, Category] = {
    "blob": Category(_blob, genus=0),
    "torus": Category(_torus_cat, genus=1),
    "double_torus": Category(_double_torus, genus=2),
    "capsule": Category(_capsule, genus=0),
    "rounded_box": Category(_rounded_box, genus=0),
    "mug": Category(_mug, genus=1),
    "chair": Category(_chair, genus=0),
    "table": Category(_table, genus=0),
    "airplane": Category(_airplane, genus=0),
    "lamp": Category(_lamp, genus=0),
    "pebbles": Category(_pebbles, genus=0, components=3),
    # Opt-in: adding a category to the default selection would change every default corpus (shape
    # i's category is round-robin over the selection), so later categories are generated only when named.
    "bracket": Category(_bracket, genus=None, opt_in=True),
}
# The selection when none is given: every category but the opt-in ones.
DEFAULT_CATEGORIES: tuple[str, ...] = tuple(name for name, c in CATEGORIES.items() if not c.opt_in)


# --- meshing -------------------------------------------------------------------------------------


def _grid_axes(lo, hi, cell):
    counts = np.ceil((hi - lo) / cell).astype(int) + 1
    return [lo[i] + cell * np.arange(counts[i], dtype=np.float32) for i in range(3)]


def _eval(sdf: Sdf, axes) -> np.ndarray:
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    shape = (len(axes[0]), len(axes[1]), len(axes[2]))
    return np.broadcast_to(sdf(x, y, z), shape).astype(np.float32)


def _bounds(sdf: Sdf) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of the solid from a coarse pass, padded by two coarse cells.

    A coarse sample closer than 2 cells (> the Lipschitz constant of our SDFs × a cell diagonal) to
    the surface counts as "near the solid", so even parts thinner than a coarse cell are found."""
    cell = 0.1
    axes = _grid_axes(np.full(3, -1.3), np.full(3, 1.3), cell)
    near = np.nonzero(_eval(sdf, axes) < 2 * cell)
    lo = np.array([axes[i][near[i].min()] for i in range(3)]) - 2 * cell
    hi = np.array([axes[i][near[i].max()] for i in range(3)]) + 2 * cell
    return lo, hi


def _mesh_sdf(sdf: Sdf, resolution: int = DEFAULT_RESOLUTION) -> trimesh.Trimesh:
    """Closed, outward-oriented triangle mesh of {sdf < 0} with grid cells of 2 / resolution."""
    cell = 2.0 / resolution
    lo, hi = _bounds(sdf)
    volume = _eval(sdf, _grid_axes(lo, hi, cell))
    # Forcing the outer layer outside closes every surface even if the bounds were too tight; and
    # no sample may sit exactly on the level, or marching cubes emits zero-area triangles.
    for axis in range(3):
        np.moveaxis(volume, axis, 0)[[0, -1]] = cell
    tiny = np.float32(1e-3 * cell)
    volume[np.abs(volume) < tiny] = tiny
    verts, faces, _, _ = marching_cubes(volume, 0.0, spacing=(cell,) * 3)
    return trimesh.Trimesh(verts + lo.astype(np.float32), faces, process=False)


# --- corpus --------------------------------------------------------------------------------------


@dataclass
class CorpusShape:
    """One corpus shape; `params` are the drawn parameters plus the yaw, JSON-ready and rounded to
    4 decimals (the mesh is built from the unrounded values)."""

    shape_id: str
    category: str
    params: dict
    mesh: trimesh.Trimesh


def _select(categories: Sequence[str] | None) -> list[str]:
    """The selected categories in registry order (so the listing order never changes the corpus);
    None selects DEFAULT_CATEGORIES."""
    if categories is None:
        return list(DEFAULT_CATEGORIES)
    if isinstance(categories, str):
        categories = [categories]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown corpus categories {unknown}; allowed: {', '.join(CATEGORIES)}")
    if not categories:
        raise ValueError(f"no corpus categories selected; allowed: {', '.join(CATEGORIES)}")
    return [c for c in CATEGORIES if c in set(categories)]


def _jsonable(value, digits: int = 4):
    if isinstance(value, dict):
        return {k: _jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (np.ndarray, list, tuple)):
        return [_jsonable(v, digits) for v in value]
    if isinstance(value, (np.integer, int)):
        return int(value)
    return round(float(value), digits)


def generate_shape(
    index: int, seed: int = 0, categories: Sequence[str] | None = None, resolution: int = DEFAULT_RESOLUTION
) -> CorpusShape:
    """Shape `index` of the corpus `seed` over `categories` (DEFAULT_CATEGORIES by default)."""
    selected = _select(categories)
    category = selected[index % len(selected)]
    rng = np.random.default_rng([seed, index])
    yaw = rng.uniform(-MAX_YAW, MAX_YAW)
    shape = CATEGORIES[category](rng)
    mesh = _mesh_sdf(shape.sdf, resolution)
    c, s = np.cos(yaw), np.sin(yaw)
    mesh.vertices = mesh.vertices @ np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])
    shape_id = f"{category}-{index:07d}"
    if not mesh.is_watertight:  # a broken construction, not bad luck: shapes are deterministic
        raise RuntimeError(f"corpus shape {shape_id} (seed {seed}) is not watertight")
    return CorpusShape(shape_id, category, _jsonable({**shape.params, "yaw": yaw}), mesh)


def _write_one(index: int, out_dir: str, seed: int, categories: list[str], resolution: int) -> dict:
    shape = generate_shape(index, seed, categories, resolution)
    rel = f"meshes/{shape.shape_id}.ply"
    cache.write_bytes(C.join(out_dir, rel), shape.mesh.export(file_type="ply"))
    return {
        "index": index,
        "id": shape.shape_id,
        "path": rel,
        "category": shape.category,
        "params": json.dumps(shape.params, separators=(",", ":")),
    }


def _write_batch(batch: dict, out_dir: str, seed: int, categories: list[str], resolution: int) -> dict:
    rows = [_write_one(int(i), out_dir, seed, categories, resolution) for i in batch["id"]]
    return {k: np.array([r[k] for r in rows]) for k in ("index", *MANIFEST_COLUMNS)}


def _rows_with_ray(n: int, out_dir: str, seed: int, categories: list[str], resolution: int) -> list[dict]:
    import ray
    import ray.data

    # Enough blocks to keep every CPU busy, few enough that per-task overhead stays small.
    cpus = int(ray.cluster_resources().get("CPU", 1))
    blocks = min(n, max(2 * cpus, math.ceil(n / 200)))
    ds = ray.data.range(n, override_num_blocks=blocks).map_batches(
        _write_batch,
        batch_size=None,
        fn_kwargs=dict(out_dir=out_dir, seed=seed, categories=categories, resolution=resolution),
    )
    return sorted(ds.take_all(), key=lambda r: int(r["index"]))


def _rows_in_process(n, out_dir, seed, categories, resolution, progress) -> list[dict]:
    rows, start, every = [], time.perf_counter(), max(1, n // 20)
    for i in range(n):
        rows.append(_write_one(i, out_dir, seed, categories, resolution))
        if progress and ((i + 1) % every == 0 or i + 1 == n):
            elapsed = time.perf_counter() - start
            rate = (i + 1) / elapsed
            print(f"corpus: {i + 1}/{n} shapes, {elapsed:.1f}s ({rate:.1f}/s)", file=sys.stderr, flush=True)
    return rows


def write_corpus(
    out_dir: str,
    n: int,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    resolution: int = DEFAULT_RESOLUTION,
    use_ray: bool = False,
    progress: bool = True,
) -> str:
    """Write shapes 0..n-1 as binary PLY to out_dir/meshes/ and index them in out_dir/manifest.csv
    (columns id, path, category, params; paths relative to out_dir). Returns the manifest path.
    `out_dir` is a local folder or an fsspec URL (s3://...): every file goes through fsspec.

    Re-running overwrites: the manifest is replaced atomically and meshes of an earlier, larger
    corpus in out_dir/meshes are removed, so the folder always holds exactly the manifest's shapes.
    With `use_ray`, shapes are generated and written by a Ray Data job on the running Ray."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    selected = _select(categories)
    out_dir = str(out_dir)
    if cache.is_local(out_dir):  # Ray workers need not share the driver's working directory
        out_dir = os.path.abspath(cache.local_path(out_dir))
    if use_ray:
        rows = _rows_with_ray(n, out_dir, seed, selected, resolution)
    else:
        rows = _rows_in_process(n, out_dir, seed, selected, resolution, progress)

    fs, meshes = fsspec.core.url_to_fs(C.join(out_dir, "meshes"))
    keep = {r["path"].rsplit("/", 1)[-1] for r in rows}
    for stale in fs.glob(C.join(meshes, "*.ply")):
        if stale.rsplit("/", 1)[-1] not in keep:
            fs.rm(stale)
    manifest = C.join(out_dir, "manifest.csv")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows([str(r[k]) for k in MANIFEST_COLUMNS] for r in rows)
    cache.write_text(manifest, text.getvalue())
    return manifest
