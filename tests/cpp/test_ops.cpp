// Calls each CPU op through the dispatcher, as a C++ user would, and compares it with plain ATen
// in float64. Exits non-zero on the first mismatch.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <vector>

namespace {

int failures = 0;

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const char* what) {
  const double err = (got - want).norm().item<double>() / std::max(want.norm().item<double>(), 1e-300);
  std::printf("%-44s rel err %.3e %s\n", what, err, err <= tol ? "ok" : "FAIL");
  if (!(err <= tol)) ++failures;
}

at::Tensor with_bias(const at::Tensor& x) {
  return at::cat({x, at::ones({x.size(0), 1}, x.options())}, 1);
}

void test_factor_update() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("ngcuda::factor_update_", "")
                .typed<void(const at::Tensor&, const at::Tensor&, double, bool,
                            const std::optional<at::Tensor>&)>();
  const at::Tensor x = at::randn({37, 5}, at::kDouble);
  const at::Tensor w = at::rand({37}, at::kDouble);
  at::Tensor f = at::eye(6, at::kDouble);
  op.call(f, x, 0.25, true, w);
  const at::Tensor xb = with_bias(x);
  const at::Tensor want = 0.25 * at::eye(6, at::kDouble) + 0.75 * xb.t().mm(xb * w.unsqueeze(1)) / w.sum();
  expect_close(f, want, 1e-12, "factor_update_ (weights, bias)");
}

void test_sparse_factor_update() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("ngcuda::sparse_factor_update_", "")
                .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const at::Tensor&, double, bool,
                            const std::optional<at::Tensor>&)>();
  // Rows: {0, 2, 2 (duplicate)}, {} (isolated), {1}.
  const at::Tensor rowptr = at::tensor(std::vector<int64_t>{0, 3, 3, 4});
  const at::Tensor col = at::tensor(std::vector<int64_t>{0, 2, 2, 1});
  const at::Tensor val = at::tensor(std::vector<double>{0.5, 1.0, 2.0, 3.0});
  const at::Tensor x = at::randn({3, 4}, at::kDouble);
  at::Tensor f = at::zeros({5, 5}, at::kDouble);
  op.call(f, rowptr, col, val, x, 0.0, true, std::nullopt);
  const at::Tensor agg = at::stack({0.5 * x[0] + 3.0 * x[2], at::zeros({4}, at::kDouble), 3.0 * x[1]});
  const at::Tensor ab = with_bias(agg);
  expect_close(f, ab.t().mm(ab) / 3.0, 1e-12, "sparse_factor_update_ (duplicates, empty row)");
}

void test_precondition() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("ngcuda::precondition", "")
                .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList,
                                               at::TensorList, at::TensorList, double)>();
  const at::Tensor a = at::randn({4, 6}, at::kDouble), gm = at::randn({3, 5}, at::kDouble);
  const at::Tensor A = a.mm(a.t()) / 6.0, G = gm.mm(gm.t()) / 5.0;
  auto [la, qa] = at::linalg_eigh(A);
  auto [lg, qg] = at::linalg_eigh(G);
  const at::Tensor g = at::randn({3, 4}, at::kDouble);
  const double damping = 0.1;
  const auto out = op.call({g}, {qa}, {la}, {qg}, {lg}, damping);
  // (A⊗G + γI) vec(P) = vec(g)  ⇔  G P A + γ P = g, with vec stacking columns.
  expect_close(G.mm(out[0]).mm(A) + damping * out[0], g, 1e-12, "precondition solves G P A + γP = g");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_factor_update();
  test_sparse_factor_update();
  test_precondition();
  std::printf("%s\n", failures == 0 ? "all C++ op tests passed" : "C++ op tests FAILED");
  return failures == 0 ? 0 : 1;
}
