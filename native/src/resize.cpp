// resize_normalize: uint8 images [h, w] or [h, w, c] of any size, bilinear
// resize (align_corners=False, no antialias: torch.nn.functional.interpolate's
// sampling), then (v / 255 - mean) / std, into float32 out [n, c, out_h, out_w].
#include <algorithm>
#include <atomic>
#include <exception>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "common.hpp"
#include "kernels.hpp"

namespace fleet {
namespace {

constexpr long long kMaxSide = 1 << 16;
constexpr long long kMaxThreads = 256;

struct Image {
  const uint8_t *data;
  int h, w;
};

// For each output index: the two source indices and their weights, computed
// as PyTorch does (float arithmetic, source index clamped at 0).
struct Taps {
  std::vector<int> i0, i1;
  std::vector<float> w0, w1;
  void compute(int in, int out) {
    i0.resize(out), i1.resize(out), w0.resize(out), w1.resize(out);
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (int o = 0; o < out; ++o) {
      float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
      if (src < 0.0f) src = 0.0f;
      int lo = static_cast<int>(src);
      if (lo > in - 1) lo = in - 1;
      float lambda = std::min(std::max(src - static_cast<float>(lo), 0.0f), 1.0f);
      i0[o] = lo;
      i1[o] = lo + (lo < in - 1 ? 1 : 0);
      w0[o] = 1.0f - lambda;
      w1[o] = lambda;
    }
  }
};

struct Job {
  int c, out_h, out_w;
  std::vector<float> scale, bias;  // per channel: out = v * scale + bias = (v / 255 - mean) / std
};

// One image: per output row, blend the two source rows (contiguous, so it
// vectorises), then gather and blend columns, normalising as it writes.
// C > 0 fixes the channel count at compile time; C == 0 reads job.c.
template <int C>
void resize_image(const Image &img, const Job &job, float *dst, std::vector<float> &row, Taps &ty, Taps &tx) {
  const int c = C > 0 ? C : job.c;
  const int oh = job.out_h, ow = job.out_w;
  const size_t plane = static_cast<size_t>(oh) * ow;
  const size_t stride = static_cast<size_t>(img.w) * c;
  ty.compute(img.h, oh);
  tx.compute(img.w, ow);
  row.resize(stride);
  float *tmp = row.data();
  for (int oy = 0; oy < oh; ++oy) {
    const uint8_t *r0 = img.data + ty.i0[oy] * stride;
    const uint8_t *r1 = img.data + ty.i1[oy] * stride;
    const float a = ty.w0[oy], b = ty.w1[oy];
    for (size_t k = 0; k < stride; ++k) tmp[k] = a * static_cast<float>(r0[k]) + b * static_cast<float>(r1[k]);
    float *out_row = dst + static_cast<size_t>(oy) * ow;
    for (int ox = 0; ox < ow; ++ox) {
      const float *p0 = tmp + static_cast<size_t>(tx.i0[ox]) * c;
      const float *p1 = tmp + static_cast<size_t>(tx.i1[ox]) * c;
      const float u = tx.w0[ox], v = tx.w1[ox];
      for (int ch = 0; ch < c; ++ch)
        out_row[ch * plane + ox] = (u * p0[ch] + v * p1[ch]) * job.scale[ch] + job.bias[ch];
    }
  }
}

void run_images(const std::vector<Image> &images, const Job &job, float *out, int threads) {
  const size_t per_image = static_cast<size_t>(job.c) * job.out_h * job.out_w;
  std::atomic<size_t> next{0};
  auto work = [&]() {
    std::vector<float> row;
    Taps ty, tx;
    for (size_t i; (i = next.fetch_add(1)) < images.size();) {
      float *dst = out + i * per_image;
      if (job.c == 3) resize_image<3>(images[i], job, dst, row, ty, tx);
      else if (job.c == 1) resize_image<1>(images[i], job, dst, row, ty, tx);
      else resize_image<0>(images[i], job, dst, row, ty, tx);
    }
  };
  std::vector<std::thread> workers;
  std::exception_ptr error;
  const size_t extra = std::min(static_cast<size_t>(threads), images.size()) - (images.empty() ? 0 : 1);
  try {
    for (size_t t = 0; t < extra; ++t) workers.emplace_back([&]() {
      try { work(); } catch (...) { next = images.size(); }  // bad_alloc: the caller's thread reports it
    });
  } catch (const std::system_error &) {
    // No more threads to be had: the ones started and this one do the work.
  }
  try { work(); } catch (...) { error = std::current_exception(); next = images.size(); }
  for (auto &t : workers) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace

nb::object resize_normalize(nb::handle images_obj, nb::handle out_h_obj, nb::handle out_w_obj, nb::handle mean_obj,
                            nb::handle std_obj, nb::handle out_obj, nb::handle threads_obj) {
  if (!PyList_Check(images_obj.ptr()) && !PyTuple_Check(images_obj.ptr()))
    throw nb::type_error("images: expected a list of uint8 NumPy arrays");
  Job job;
  job.out_h = static_cast<int>(require_int(out_h_obj, "out_h", 1, kMaxSide));
  job.out_w = static_cast<int>(require_int(out_w_obj, "out_w", 1, kMaxSide));
  auto mean = require<In<float, 1>>(mean_obj, "mean: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  auto std = require<In<float, 1>>(std_obj, "std: expected a C-contiguous float32 NumPy array with 1 dimension(s)");
  const int threads = static_cast<int>(require_int(threads_obj, "threads", 1, kMaxThreads));
  if (mean.shape(0) == 0) throw nb::value_error("mean: needs one entry per channel, got none");
  if (std.shape(0) != mean.shape(0)) throw nb::value_error("std: length must equal len(mean)");
  job.c = static_cast<int>(mean.shape(0));
  for (int ch = 0; ch < job.c; ++ch) {
    if (!(std.data()[ch] > 0.0f)) throw nb::value_error("std: every entry must be > 0");
    job.scale.push_back(1.0f / (255.0f * std.data()[ch]));
    job.bias.push_back(-mean.data()[ch] / std.data()[ch]);
  }

  nb::sequence seq = nb::borrow<nb::sequence>(images_obj);
  const size_t n = nb::len(seq);
  std::vector<Image> images(n);
  std::vector<nb::object> keep(n);  // the arrays stay alive while the GIL is released
  for (size_t i = 0; i < n; ++i) {
    keep[i] = seq[i];
    const std::string at = "images[" + std::to_string(i) + "]: ";
    In<uint8_t, 3> rgb;
    In<uint8_t, 2> gray;
    int channels;
    if (nb::try_cast(keep[i], rgb, false)) {
      images[i] = {rgb.data(), static_cast<int>(rgb.shape(0)), static_cast<int>(rgb.shape(1))};
      channels = static_cast<int>(rgb.shape(2));
      if (rgb.shape(0) > kMaxSide * 16 || rgb.shape(1) > kMaxSide * 16 || rgb.shape(2) > kMaxSide)
        throw nb::value_error((at + "is too large").c_str());
    } else if (nb::try_cast(keep[i], gray, false)) {
      images[i] = {gray.data(), static_cast<int>(gray.shape(0)), static_cast<int>(gray.shape(1))};
      channels = 1;
      if (gray.shape(0) > kMaxSide * 16 || gray.shape(1) > kMaxSide * 16)
        throw nb::value_error((at + "is too large").c_str());
    } else {
      throw nb::type_error((at + "expected a C-contiguous uint8 NumPy array with 2 or 3 dimensions").c_str());
    }
    if (channels != job.c)
      throw nb::value_error((at + "has " + std::to_string(channels) + " channel(s), mean and std have " +
                             std::to_string(job.c)).c_str());
    if (images[i].h == 0 || images[i].w == 0) throw nb::value_error((at + "is empty").c_str());
  }

  const size_t shape[4] = {n, static_cast<size_t>(job.c), static_cast<size_t>(job.out_h),
                           static_cast<size_t>(job.out_w)};
  Out<float, 4> out;
  nb::object result;
  if (out_obj.is_none()) {
    out = new_array<float, 4>(shape);
    result = nb::cast(out);
  } else {
    out = require<Out<float, 4>>(out_obj, "out: expected a writable, C-contiguous float32 NumPy array with 4 dimension(s)");
    for (int k = 0; k < 4; ++k)
      if (out.shape(k) != shape[k])
        throw nb::value_error("out: shape must be (len(images), len(mean), out_h, out_w)");
    result = nb::borrow(out_obj);
  }
  {
    nb::gil_scoped_release release;
    run_images(images, job, out.data(), threads);
  }
  return result;
}

}  // namespace fleet
