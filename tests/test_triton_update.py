"""The jax-triton kernel (``implementation="triton"``) under Triton's interpreter, without a GPU.

Triton interprets its own functions only when ``TRITON_INTERPRET=1`` is set
before it is imported, so the kernel runs in one child process (this file run
as a script) that reports each case; the tests read the report.

Reference: the step's equations in NumPy float32, one operation at a time
(Adam-mini, arXiv:2406.16793, Alg. 1; the square-law and linear codes of
``quantize``; the rounding hash of ``random_bits``, written here again), which
the kernel must give bit for bit: codes, scales and outputs. The jnp path runs
on XLA, which contracts ``b1*m + (1-b1)*g`` into FMAs as it likes, so against
it the bound of ``test_pallas_update`` holds instead (scales within 4 ulp, codes
equal but for rare +-1), checked through the optimizer on stacked layers too.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

if __name__ != "__main__":  # the child checks that the package itself imports no Triton
  pytest.importorskip("triton", reason="no triton wheel for this platform (Linux x86-64/aarch64 only)")
  pytest.importorskip("torch", reason="the Triton interpreter runs on torch CPU tensors")

# name: (shape, block axes, stochastic, fuse_step, dtype, int8 weights, a shard (axis of the
# (a, b) view, start, stop) or, for a stack, the number of layers ahead of ``shape``)
KERNEL_CASES = {
    "rows_ragged_rtn_direction": ((100, 300), (1,), False, False, "float32", False, None),
    "columns_ragged_sr_fused": ((300, 100), (0,), True, True, "float32", False, None),
    "three_d_rows_sr_direction": ((40, 4, 16), (1, 2), True, False, "float32", False, None),
    "short_columns_rtn_fused": ((33, 1000), (0,), False, True, "float32", False, None),
    "bf16_columns_sr_fused": ((300, 100), (0,), True, True, "bfloat16", False, None),
    "int8_weights_rows_rtn": ((100, 300), (1,), False, True, "float32", True, None),
    "int8_weights_columns_sr": ((300, 100), (0,), True, True, "float32", True, None),
    "shard_of_rows_sr_fused": ((100, 300), (1,), True, True, "float32", False, (0, 40, 100)),
    "shard_of_columns_sr_fused": ((300, 100), (0,), True, True, "float32", False, (1, 40, 100)),
    "stack_of_3_columns_sr_fused": ((300, 100), (0,), True, True, "float32", False, 3),
    "stack_of_3_int8_weights_rows_sr": ((100, 300), (1,), True, True, "float32", True, 3),
}
FIRST_LAYER = 5  # a stack's first layer (in_backward hands a transform layers 5, 6, ...)
# One model, INT8 weights: a stack on axis 0 (one launch over its layers), one on axis 1 (a
# launch per layer), an embedding.
OPTIMIZER_CASES = ("two_stacks_int8_weights",)


def _mix32(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x21F0AAAD)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0xD35A2D97)
  return x ^ (x >> np.uint32(15))


def _layer_seeds(s0, s1, layer):
  golden = np.uint32(0x9E3779B9)
  with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as intended
    t0 = _mix32(s0 ^ _mix32(np.uint32(layer) * golden + golden))
    return t0, _mix32(t0 ^ s1)


def _uniform(index, s0, s1):
  bits = _mix32(_mix32(index ^ s0) + s1)
  return (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def _requantize(x, columns, group, r, weights):
  """Codes and scales of ``x`` (a, b) float32: groups of ``group`` along the columns or rows."""
  a, b = x.shape
  padded = np.zeros((-(-a // group) * group, b) if columns else (a, -(-b // group) * group),
                    np.float32)
  padded[:a, :b] = np.abs(x)
  view = padded.reshape(-1, group, b) if columns else padded.reshape(a, -1, group)
  scales = view.max(axis=1 if columns else 2)  # (groups, b) or (a, groups)
  if weights:  # the smallest float32 >= scale with 3 mantissa bits
    drop = np.uint32((1 << 20) - 1)
    scales = ((scales.view(np.uint32) + drop) & ~drop).view(np.float32)
  s = np.repeat(scales, group, axis=0)[:a] if columns else np.repeat(scales, group, axis=1)[:, :b]
  levels = np.float32(127.0 if weights else 127.0 * 127.0)
  with np.errstate(divide="ignore"):
    inv = np.where(s > 0, levels / np.where(s > 0, s, np.float32(1)), np.float32(0))
  y = np.abs(x) * inv
  if weights:
    k = np.floor(y)
    up = y - k >= np.float32(1) - r
  else:
    k = np.floor(np.sqrt(y))
    up = y - k * k >= (np.float32(1) - r) * (np.float32(2) * k + np.float32(1))
  code = np.minimum(np.where(up, k + np.float32(1), k), np.float32(127))
  return np.where(x < 0, -code, code).astype(np.int8), scales.astype(np.float32)


def _decode(codes, scales, columns, group, linear):
  a, b = codes.shape
  s = np.repeat(scales, group, axis=0)[:a] if columns else np.repeat(scales, group, axis=1)[:, :b]
  c = codes.astype(np.float32)
  return c * np.float32(1 / 127) * s if linear else c * np.abs(c) * np.float32(1 / 127**2) * s


def _reference(run, layout, stochastic, fuse_step, int8_params):
  """The launch's outputs from the equations (NumPy float32), on the (a, b) view of
  each layer (a stack: layer by layer, each on its own streams)."""
  inputs = [np.asarray(x) for x in run.inputs]
  layers = run.constants["LAYERS"]
  if not layers:
    return _reference_layer(inputs, run, layout, stochastic, fuse_step, int8_params)
  seeds = inputs[1].astype(np.uint32)
  per_layer = []
  for layer in range(layers):
    streams = [_layer_seeds(seeds[w], seeds[w + 1], seeds[-1] + np.uint32(layer))
               for w in ((0, 4) if int8_params else (0,))]
    layer_seeds = np.asarray([*streams[0], seeds[2], seeds[3], *(streams[1:] and streams[1])],
                             np.uint32)
    per_layer.append(_reference_layer(
        [inputs[0], layer_seeds, *(x[layer] for x in inputs[2:])], run, layout, stochastic,
        fuse_step, int8_params))
  return [np.stack(outputs) for outputs in zip(*per_layer)]


def _reference_layer(inputs, run, layout, stochastic, fuse_step, int8_params):
  k = run.constants
  hyper = inputs[0]
  seeds = inputs[1].astype(np.uint32)
  if int8_params:
    p_codes, p_scales, g, codes, scales, factor = inputs[2:]
  else:
    p, g, codes, scales, factor = inputs[2:]
  columns, group = layout.columns, layout.group_size
  g = g.astype(np.float32)
  m = hyper[0] * _decode(codes, scales, columns, group, False) + hyper[1] * g
  u = m * np.broadcast_to(factor, g.shape)
  if fuse_step:
    p = (_decode(p_codes, p_scales, columns, group, True) if int8_params else
         p.astype(np.float32))
    u = p + hyper[2] * (u + hyper[3] * p)
  a, b = g.shape
  i, j = np.meshgrid(np.arange(a, dtype=np.uint32), np.arange(b, dtype=np.uint32), indexing="ij")
  index = (i + seeds[2]) * np.uint32(k["STRIDE"]) + j + seeds[3]
  half = np.float32(0.5)
  out = []
  if int8_params:
    r = _uniform(index, seeds[4], seeds[5]) if k["PARAMS_STOCHASTIC"] else half
    out += list(_requantize(u, columns, group, r, True))
  else:
    out.append(u.astype(run.out_shapes[0].dtype))
  r = _uniform(index, seeds[0], seeds[1]) if stochastic else half
  return out + list(_requantize(m, columns, group, r, False))


def _kernel_case(name):
  """Run one case in the interpreter: whether each output equals the reference bit for bit."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from qadam_mini_jax import pallas_update, partition, quantize, random_bits, transform  # pylint: disable=g-import-not-at-top
  from qadam_mini_jax import triton_update  # pylint: disable=g-import-not-at-top

  shape, axes, stochastic, fuse_step, dtype, int8_params, shard = KERNEL_CASES[name]
  layers, shard = (shard, None) if isinstance(shard, int) else (0, shard)
  spec = partition.BlockSpec(axes)
  layout = transform.layout_for(spec, shape, transform.Int8Quantization(min_size=1))
  lead = (layers,) if layers else ()
  factor_axes = pallas_update.factor_axes(spec, layout)
  # Inputs drawn and quantized in NumPy (nothing to compile): the leaf's (a, b) view.
  rng = np.random.default_rng(len(name))
  view = lead + (layout.a, layout.b)
  normal = lambda scale=1.0: (rng.standard_normal(view) * scale).astype(np.float32)

  def quantized(x, weights):
    per_layer = [_requantize(x2, layout.columns, layout.group_size, np.float32(0.5), weights)
                 for x2 in (x if layers else [x])]
    codes, scales = (np.stack(parts) if layers else parts[0] for parts in zip(*per_layer))
    return quantize.QuantizedArray(codes, scales)

  g = normal().astype(jnp.dtype(dtype))
  q = quantized(normal(0.1), False)
  p = quantized(normal(), True) if int8_params else normal().astype(jnp.dtype(dtype))
  factor = np.abs(rng.standard_normal(lead + (layout.a if factor_axes["a_varies"] else 1,
                                              layout.b if factor_axes["b_varies"] else 1)))
  factor = (factor + 0.5).astype(np.float32)
  hyper = np.asarray([0.9, 1 - np.float32(0.9), -1e-2, 0.1, 0, 0, 0, 0], np.float32)
  words = random_bits.key_words(7)
  streams = [random_bits.stream_seeds(words, jnp.int32(5), random_bits.path_stream(name), purpose)
             for purpose in (random_bits.MOMENT, random_bits.WEIGHTS)]
  stride = None
  offsets = [0, 0]
  if shard is not None:  # rows or columns [start, stop) as one shard: whole-leaf indices
    axis, start, stop = shard
    cut = lambda x: x[start:stop] if axis == 0 else x[:, start:stop]
    g, p, q = cut(g), cut(p), quantize.QuantizedArray(cut(q.codes), cut(q.scales))
    factor = cut(factor) if factor_axes["b_varies" if axis else "a_varies"] else factor
    offsets[axis] = start
    stride, layout = layout.b, layout._replace(shape=g.shape)
  seeds = np.asarray([*streams[0], *offsets] + (list(streams[1]) if int8_params else [])
                     + ([FIRST_LAYER] if layers else []), np.uint32)
  run = triton_update.launch(
      p if fuse_step else g, g, q, factor, hyper, seeds, layout=layout, stochastic=stochastic,
      fuse_step=fuse_step, stride=stride, params_stochastic=stochastic if int8_params else None,
      layers=layers, **factor_axes)
  got = triton_update.run_interpreted(run)
  want = _reference(run, layout, stochastic, fuse_step, int8_params)
  bits = lambda x: np.asarray(x).view(np.uint8)
  report = {f"output {k}": bool(np.array_equal(bits(x), bits(y)))
            for k, (x, y) in enumerate(zip(got, want))}
  if dtype == "bfloat16" and not int8_params:
    # Triton's interpreter converts float32 to bfloat16 by a rounding of its own
    # (ties up, no carry into the exponent); a GPU rounds to nearest even. Within
    # one bfloat16 step of the reference here; bit for bit in gpu_check.sh.
    step = np.abs(np.asarray(got[0]).view(np.int16).astype(np.int32)
                  - np.asarray(want[0]).view(np.int16).astype(np.int32))
    report = {**report, "output 0": bool(step.max() <= 1)}
  return report


def _optimizer_case(name):
  """``q_adam_mini`` with ``implementation="triton"`` (interpreted) against ``"xla"``, 3 steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import qadam_mini_jax as q  # pylint: disable=g-import-not-at-top

  del name
  params = {"layers": {"mlp": {"kernel": jax.random.normal(jax.random.key(0), (3, 300, 100))}},
            "blocks": {"mlp": {"kernel": jax.random.normal(jax.random.key(2), (300, 3, 100))}},
            "embed": {"embedding": jax.random.normal(jax.random.key(1), (100, 300))}}
  part = q.BlockPartition(layers={"layers": (0,), "blocks": (1,)})
  int8 = q.Int8Quantization(min_size=1000)
  results = {}
  for implementation in ("xla", "triton"):
    opt = q.fused_q_adam_mini(1e-2, partition=part, quantization=int8, weight_decay=0.1,
                              stochastic_rounding="all", implementation=implementation)
    x = q.quantize_params(params, part, int8)
    state = opt.init(x)
    step = jax.jit(opt.step)
    for t in range(3):
      grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(10 + t), p.shape), params)
      x, state = step(grads, state, x)
    results[implementation] = (x, state)
  leaves = lambda tree: [np.asarray(v) for v in jax.tree.leaves(tree)]
  report = {}
  for k, (a, b) in enumerate(zip(leaves(results["xla"]), leaves(results["triton"]))):
    if a.dtype == np.int8:
      diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
      report[f"leaf {k}: int8 codes equal but for rare +-1"] = bool(
          diff.max(initial=0) <= 1 and diff.mean() < 1e-3)
    else:
      report[f"leaf {k}: within 4 ulp"] = bool(np.allclose(a, b, rtol=4 * 2**-23, atol=1e-7))
  return report


def test_the_package_imports_without_triton(report):
  assert report["triton imported by `import qadam_mini_jax`"] is False


def test_off_a_gpu_triton_needs_the_interpreter(monkeypatch):
  import qadam_mini_jax as q  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("TRITON_INTERPRET", raising=False)
  with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
    q.q_adam_mini(1e-3, implementation="triton")


def test_on_a_gpu_without_the_extra_triton_names_it_and_auto_passes_over(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import qadam_mini_jax as q  # pylint: disable=g-import-not-at-top
  from qadam_mini_jax import transform, triton_update  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setitem(sys.modules, "jax_triton", None)  # as if not installed
  with pytest.raises(triton_update.TritonMissing, match=r"pip install 'qadam_mini_jax\[gpu\]'"):
    q.q_adam_mini(1e-3, implementation="triton")
  with pytest.raises(ValueError, match="power-of-two group size"):
    q.q_adam_mini(1e-3, quantization=q.Int8Quantization(group_size=100), implementation="triton")
  monkeypatch.setattr(transform, "AUTO_KERNELS_ON_GPU", ("triton", "pallas"))
  with pytest.warns(UserWarning, match="passes over the 'triton' kernel"):
    assert transform.resolve_implementation("auto", q.Int8Quantization()) == "triton"  # Pallas's


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ, TRITON_INTERPRET="1")
  child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                         check=False)
  assert child.returncode == 0, child.stderr[-4000:]
  return json.loads(child.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_interpreted_kernel_gives_the_equations_bit_for_bit(report, name):
  assert report[name] and all(report[name].values()), report[name]


@pytest.mark.parametrize("name", OPTIMIZER_CASES)
def test_triton_implementation_follows_the_xla_path(report, name):
  assert report[name] and all(report[name].values()), report[name]


if __name__ == "__main__":
  import qadam_mini_jax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  out = {"triton imported by `import qadam_mini_jax`": "triton" in sys.modules}
  out.update({name: _kernel_case(name) for name in KERNEL_CASES})
  out.update({name: _optimizer_case(name) for name in OPTIMIZER_CASES})
  print(json.dumps(out))
