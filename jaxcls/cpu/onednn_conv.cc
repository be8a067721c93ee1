// 2-D convolutions for XLA:CPU through oneDNN: forward, input gradient, weight gradient.
//
// Three XLA FFI handlers (jaxcls_onednn_conv_forward, _backward_data, _backward_weights)
// on float32 NHWC activations and HWIO weights, the layouts flax uses. jaxcls compiles this
// file on first use (jaxcls/cpu/onednn.py) against the oneDNN runtime from pip's
// `onednn-cpu-gomp`, which ships no headers: the part of oneDNN's C API used here is
// declared below, with the values of oneDNN 3.x's dnnl_types.h (stable across 3.x).
//
// Each convolution geometry gets its oneDNN primitives once (created under a lock, then
// shared). Weights are reordered to the layout oneDNN's kernel prefers on every call,
// since they change every step. Scratch memory is per call ("user" scratchpad mode), so
// several XLA threads (pmap's devices) can run primitives at once.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>

#include "xla/ffi/api/ffi.h"

extern "C" {
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef const struct dnnl_primitive* const_dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;
typedef int64_t dnnl_dims_t[12];
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;

int dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
int dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
int dnnl_stream_destroy(dnnl_stream_t);
int dnnl_stream_wait(dnnl_stream_t);
int dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t*, int ndims, const dnnl_dims_t dims,
                                     int data_type, int tag);
int dnnl_memory_desc_destroy(dnnl_memory_desc_t);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t, const_dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t);
int dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
int dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
int dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
int dnnl_convolution_forward_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int prop_kind, int alg_kind,
    const_dnnl_memory_desc_t src, const_dnnl_memory_desc_t weights,
    const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_attr_t);
int dnnl_convolution_backward_data_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t diff_src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t diff_dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l,
    const dnnl_dims_t padding_r, const_dnnl_primitive_desc_t hint,
    const_dnnl_primitive_attr_t);
int dnnl_convolution_backward_weights_primitive_desc_create(
    dnnl_primitive_desc_t*, dnnl_engine_t, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t diff_weights, const_dnnl_memory_desc_t diff_bias,
    const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides, const dnnl_dims_t dilates,
    const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint, const_dnnl_primitive_attr_t);
int dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t*, const_dnnl_memory_desc_t src,
                                       dnnl_engine_t, const_dnnl_memory_desc_t dst,
                                       dnnl_engine_t, const_dnnl_primitive_attr_t);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t, int what,
                                                      int index);
int dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
int dnnl_primitive_create(dnnl_primitive_t*, const_dnnl_primitive_desc_t);
int dnnl_primitive_destroy(dnnl_primitive_t);
int dnnl_memory_create(dnnl_memory_t*, const_dnnl_memory_desc_t, dnnl_engine_t, void* handle);
int dnnl_memory_destroy(dnnl_memory_t);
int dnnl_primitive_execute(const_dnnl_primitive_t, dnnl_stream_t, int nargs,
                           const dnnl_exec_arg_t* args);
}

namespace {

namespace ffi = xla::ffi;

// oneDNN 3.x enum values (dnnl_types.h, dnnl_common_types.h).
constexpr int kCpu = 1, kStreamDefault = 1, kF32 = 3;
constexpr int kTagAny = 1, kTagNhwc = 22 /* acdb */, kTagHwio = 28 /* cdba */;
constexpr int kForwardTraining = 64, kConvolutionDirect = 1, kScratchpadUser = 1;
constexpr int kQueryWeights = 131, kQueryDiffWeights = 132, kQueryScratchpad = 136;
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgDiffSrc = 129,
              kArgDiffDst = 145, kArgDiffWeights = 161, kArgScratchpad = 80;

// Batch, input height/width/channels, output channels, kernel height/width, strides,
// paddings (top, bottom, left, right).
using Geometry = std::array<int64_t, 13>;
enum { N, H, W, C, O, KH, KW, SH, SW, PT, PB, PL, PR };

int64_t OutSize(int64_t in, int64_t k, int64_t s, int64_t lo, int64_t hi) {
  return (in + lo + hi - k) / s + 1;
}

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    return dnnl_engine_create(&e, kCpu, 0) == 0 ? e : nullptr;
  }();
  return engine;
}

// A memory descriptor that frees itself.
struct Desc {
  dnnl_memory_desc_t md = nullptr;
  Desc(int64_t a, int64_t b, int64_t c, int64_t d, int tag) {
    dnnl_dims_t dims = {a, b, c, d};
    if (dnnl_memory_desc_create_with_tag(&md, 4, dims, kF32, tag) != 0) md = nullptr;
  }
  ~Desc() {
    if (md) dnnl_memory_desc_destroy(md);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
};

struct Primitive {
  dnnl_primitive_desc_t pd = nullptr;
  dnnl_primitive_t prim = nullptr;
  ~Primitive() {
    if (prim) dnnl_primitive_destroy(prim);
    if (pd) dnnl_primitive_desc_destroy(pd);
  }
  bool Make() { return pd && dnnl_primitive_create(&prim, pd) == 0; }
  size_t Scratch() const {
    return dnnl_memory_desc_get_size(dnnl_primitive_desc_query_md(pd, kQueryScratchpad, 0));
  }
};

// Everything one geometry needs: the three convolutions and the weight reorders between
// HWIO and the layouts they prefer (absent when the layouts are the same).
struct Plan {
  Geometry g;
  Primitive forward, backward_data, backward_weights;
  Primitive weights_to_forward, weights_to_backward_data, backward_weights_to_hwio;
  std::unique_ptr<Desc> src, dst, hwio;
};

bool MakeReorder(Primitive& p, const_dnnl_memory_desc_t from, const_dnnl_memory_desc_t to,
                 const_dnnl_primitive_attr_t attr) {
  if (dnnl_memory_desc_equal(from, to)) return true;
  return dnnl_reorder_primitive_desc_create(&p.pd, from, Engine(), to, Engine(), attr) == 0 &&
         p.Make();
}

std::unique_ptr<Plan> MakePlan(const Geometry& g) {
  if (!Engine()) return nullptr;
  // A window larger than the padded input has no output (C++ division would round the
  // negative size up to one output row).
  if (g[H] + g[PT] + g[PB] < g[KH] || g[W] + g[PL] + g[PR] < g[KW]) return nullptr;
  const int64_t oh = OutSize(g[H], g[KH], g[SH], g[PT], g[PB]);
  const int64_t ow = OutSize(g[W], g[KW], g[SW], g[PL], g[PR]);
  auto plan = std::make_unique<Plan>();
  plan->g = g;
  // oneDNN's logical orders are NCHW and OIHW whatever the memory layout.
  plan->src = std::make_unique<Desc>(g[N], g[C], g[H], g[W], kTagNhwc);
  plan->dst = std::make_unique<Desc>(g[N], g[O], oh, ow, kTagNhwc);
  plan->hwio = std::make_unique<Desc>(g[O], g[C], g[KH], g[KW], kTagHwio);
  Desc any(g[O], g[C], g[KH], g[KW], kTagAny);
  if (!plan->src->md || !plan->dst->md || !plan->hwio->md || !any.md) return nullptr;
  dnnl_dims_t strides = {g[SH], g[SW]}, dilates = {0, 0};
  dnnl_dims_t pad_l = {g[PT], g[PL]}, pad_r = {g[PB], g[PR]};
  dnnl_primitive_attr_t attr = nullptr;
  if (dnnl_primitive_attr_create(&attr) != 0) return nullptr;
  std::unique_ptr<dnnl_primitive_attr, int (*)(dnnl_primitive_attr_t)> attr_owner(
      attr, dnnl_primitive_attr_destroy);
  if (dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser) != 0) return nullptr;
  Plan& p = *plan;
  bool ok =
      dnnl_convolution_forward_primitive_desc_create(
          &p.forward.pd, Engine(), kForwardTraining, kConvolutionDirect, p.src->md, any.md,
          nullptr, p.dst->md, strides, dilates, pad_l, pad_r, attr) == 0 &&
      p.forward.Make() &&
      dnnl_convolution_backward_data_primitive_desc_create(
          &p.backward_data.pd, Engine(), kConvolutionDirect, p.src->md, any.md, p.dst->md,
          strides, dilates, pad_l, pad_r, p.forward.pd, attr) == 0 &&
      p.backward_data.Make() &&
      dnnl_convolution_backward_weights_primitive_desc_create(
          &p.backward_weights.pd, Engine(), kConvolutionDirect, p.src->md, any.md, nullptr,
          p.dst->md, strides, dilates, pad_l, pad_r, p.forward.pd, attr) == 0 &&
      p.backward_weights.Make();
  ok = ok &&
       MakeReorder(p.weights_to_forward, p.hwio->md,
                   dnnl_primitive_desc_query_md(p.forward.pd, kQueryWeights, 0), attr) &&
       MakeReorder(p.weights_to_backward_data, p.hwio->md,
                   dnnl_primitive_desc_query_md(p.backward_data.pd, kQueryWeights, 0), attr) &&
       MakeReorder(p.backward_weights_to_hwio,
                   dnnl_primitive_desc_query_md(p.backward_weights.pd, kQueryDiffWeights, 0),
                   p.hwio->md, attr);
  return ok ? std::move(plan) : nullptr;
}

// Plans by geometry, made once and kept for the life of the process (one per shape, a
// few hundred kilobytes of generated code each). Calls only read the map; a new shape,
// met when tracing, is planned outside the lock.
const Plan* GetPlan(const Geometry& g) {
  static std::shared_mutex mutex;
  static auto* plans = new std::map<Geometry, std::unique_ptr<Plan>>();
  {
    std::shared_lock<std::shared_mutex> lock(mutex);
    auto it = plans->find(g);
    if (it != plans->end()) return it->second.get();
  }
  std::unique_ptr<Plan> plan = MakePlan(g);
  std::unique_lock<std::shared_mutex> lock(mutex);
  return plans->emplace(g, std::move(plan)).first->second.get();  // First one kept.
}

// A 64-byte-aligned buffer for one call (reordered weights, scratch).
struct Buffer {
  void* data = nullptr;
  explicit Buffer(size_t bytes) {
    if (bytes) data = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  }
  ~Buffer() { std::free(data); }
  bool failed(size_t bytes) const { return bytes && !data; }
};

// Memory objects over given pointers, destroyed together after the call.
struct Args {
  std::array<dnnl_exec_arg_t, 4> args;
  int count = 0;
  bool ok = true;
  void Add(int arg, const_dnnl_memory_desc_t md, void* data) {
    dnnl_memory_t m = nullptr;
    if (count == static_cast<int>(args.size()) ||
        dnnl_memory_create(&m, md, Engine(), data) != 0) {
      ok = false;
      return;
    }
    args[count++] = {arg, m};
  }
  ~Args() {
    for (int i = 0; i < count; ++i) dnnl_memory_destroy(args[i].memory);
  }
};

// Runs `p` on `args` plus scratch memory of its own (user scratchpad mode).
ffi::Error Run(const Primitive& p, Args& args, dnnl_stream_t stream) {
  size_t bytes = p.Scratch();
  Buffer scratch(bytes);
  if (scratch.failed(bytes)) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "out of memory");
  args.Add(kArgScratchpad, dnnl_primitive_desc_query_md(p.pd, kQueryScratchpad, 0),
           scratch.data);
  if (!args.ok) return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN memory creation failed");
  if (dnnl_primitive_execute(p.prim, stream, args.count, args.args.data()) != 0 ||
      dnnl_stream_wait(stream) != 0)
    return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN primitive execution failed");
  return ffi::Error::Success();
}

// Converts weights between HWIO and a primitive's layout.
ffi::Error Reorder(const Primitive& reorder, const_dnnl_memory_desc_t from, void* from_data,
                   const_dnnl_memory_desc_t to, void* to_data, dnnl_stream_t stream) {
  Args args;
  args.Add(kArgSrc, from, from_data);
  args.Add(kArgDst, to, to_data);
  return Run(reorder, args, stream);
}

dnnl_stream_t Stream() {
  thread_local std::unique_ptr<dnnl_stream, int (*)(dnnl_stream_t)> stream(
      [] {
        dnnl_stream_t s = nullptr;
        return Engine() && dnnl_stream_create(&s, Engine(), kStreamDefault) == 0 ? s
                                                                                  : nullptr;
      }(),
      dnnl_stream_destroy);
  return stream.get();
}

using F32 = ffi::Buffer<ffi::F32, 4>;

Geometry Make(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, int64_t sh, int64_t sw,
              int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return {x[0], x[1], x[2], x[3], w[3], w[0], w[1], sh, sw, pt, pb, pl, pr};
}

// The output gradient's (or output's) dims are those the plan computes.
ffi::Error CheckOutput(const Geometry& g, ffi::Span<const int64_t> y) {
  const int64_t expected[4] = {g[N], OutSize(g[H], g[KH], g[SH], g[PT], g[PB]),
                               OutSize(g[W], g[KW], g[SW], g[PL], g[PR]), g[O]};
  if (!std::equal(y.begin(), y.end(), expected))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "convolution output shape does not match its input and weights");
  return ffi::Error::Success();
}

ffi::Error Setup(const Geometry& g, ffi::Span<const int64_t> y, const Plan*& plan,
                 dnnl_stream_t& stream) {
  if (auto e = CheckOutput(g, y); e.failure()) return e;
  plan = GetPlan(g);
  stream = Stream();
  if (!plan || !stream)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "oneDNN cannot run this convolution geometry");
  return ffi::Error::Success();
}

// The forward pass and the input gradient: an activation (`in`) and the HWIO weights
// (reordered first if `p` wants another layout) make an activation (`out`).
ffi::Error RunWithWeights(const Plan& plan, const Primitive& p, const Primitive& reorder,
                          int in_arg, const_dnnl_memory_desc_t in_md, void* in, void* hwio,
                          int out_arg, const_dnnl_memory_desc_t out_md, void* out,
                          dnnl_stream_t stream) {
  const_dnnl_memory_desc_t weights_md = dnnl_primitive_desc_query_md(p.pd, kQueryWeights, 0);
  void* weights = hwio;
  size_t bytes = reorder.prim ? dnnl_memory_desc_get_size(weights_md) : 0;
  Buffer copy(bytes);
  if (copy.failed(bytes)) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "out of memory");
  if (reorder.prim) {
    weights = copy.data;
    if (auto e = Reorder(reorder, plan.hwio->md, hwio, weights_md, weights, stream);
        e.failure())
      return e;
  }
  Args args;
  args.Add(in_arg, in_md, in);
  args.Add(kArgWeights, weights_md, weights);
  args.Add(out_arg, out_md, out);
  return Run(p, args, stream);
}

ffi::Error Forward(F32 x, F32 w, ffi::ResultBuffer<ffi::F32, 4> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  const Plan* plan;
  dnnl_stream_t stream;
  if (auto e = Setup(Make(x.dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr),
                     y->dimensions(), plan, stream);
      e.failure())
    return e;
  return RunWithWeights(*plan, plan->forward, plan->weights_to_forward, kArgSrc,
                        plan->src->md, x.typed_data(), w.typed_data(), kArgDst,
                        plan->dst->md, y->typed_data(), stream);
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::ResultBuffer<ffi::F32, 4> dx, int64_t sh,
                        int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  const Plan* plan;
  dnnl_stream_t stream;
  if (auto e = Setup(Make(dx->dimensions(), w.dimensions(), sh, sw, pt, pb, pl, pr),
                     dy.dimensions(), plan, stream);
      e.failure())
    return e;
  return RunWithWeights(*plan, plan->backward_data, plan->weights_to_backward_data,
                        kArgDiffDst, plan->dst->md, dy.typed_data(), w.typed_data(),
                        kArgDiffSrc, plan->src->md, dx->typed_data(), stream);
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32, 4> dw, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  const Plan* plan;
  dnnl_stream_t stream;
  if (auto e = Setup(Make(x.dimensions(), dw->dimensions(), sh, sw, pt, pb, pl, pr),
                     dy.dimensions(), plan, stream);
      e.failure())
    return e;
  const_dnnl_memory_desc_t md =
      dnnl_primitive_desc_query_md(plan->backward_weights.pd, kQueryDiffWeights, 0);
  const bool reorder = plan->backward_weights_to_hwio.prim != nullptr;
  size_t bytes = reorder ? dnnl_memory_desc_get_size(md) : 0;
  Buffer copy(bytes);
  if (copy.failed(bytes)) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "out of memory");
  void* out = reorder ? copy.data : dw->typed_data();
  {
    Args args;
    args.Add(kArgSrc, plan->src->md, x.typed_data());
    args.Add(kArgDiffDst, plan->dst->md, dy.typed_data());
    args.Add(kArgDiffWeights, md, out);
    if (auto e = Run(plan->backward_weights, args, stream); e.failure()) return e;
  }
  if (!reorder) return ffi::Error::Success();
  return Reorder(plan->backward_weights_to_hwio, md, out, plan->hwio->md, dw->typed_data(),
                 stream);
}

#define JAXCLS_CONV_ATTRS                                                          \
  .Attr<int64_t>("stride_h").Attr<int64_t>("stride_w").Attr<int64_t>("pad_top")    \
      .Attr<int64_t>("pad_bottom").Attr<int64_t>("pad_left").Attr<int64_t>("pad_right")

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxcls_onednn_conv_forward, Forward,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  JAXCLS_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxcls_onednn_conv_backward_data, BackwardData,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  JAXCLS_CONV_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxcls_onednn_conv_backward_weights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>()
                                  JAXCLS_CONV_ATTRS);

// Whether oneDNN can run a geometry (its plan made and kept): asked at trace time, so that
// jaxcls falls back to XLA's convolution rather than failing when the step runs.
extern "C" int jaxcls_onednn_conv_supported(const int64_t* geometry) {
  Geometry g;
  std::copy(geometry, geometry + g.size(), g.begin());
  return GetPlan(g) != nullptr;
}
