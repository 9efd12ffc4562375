// The schemas of the CPU kernels, registered once. Each op's CPU implementation lives in its own file.
// The public, device-dispatching ops are `torch.ops.dynbatch.*`, defined in dynbatch_kernels/ops/;
// these `dynbatch_cpp` ops are the C++ backend behind them. The module also exports the kernels' table
// columns (columns.h) as `dynbatch_kernels._C.COLUMNS`, a {name: index} dict the tests compare with
// dynbatch_kernels/columns.py.
#include <Python.h>
#include <torch/library.h>

#include "columns.h"

TORCH_LIBRARY(dynbatch_cpp, m) {
  m.def(
      "accumulate_(Tensor(a!) acc, Tensor(b!) grad, Tensor chunk_starts, Tensor chunk_ends, "
      "Tensor segment_chunks, float scale, bool zero_grad) -> Tensor");
  m.def(
      "lamb_step_(Tensor(a!) param, Tensor(b!) grad, Tensor(c!) exp_avg, Tensor(d!) exp_avg_sq, "
      "Tensor(e!)? master, Tensor(f!) step, Tensor hyper, Tensor chunk_starts, Tensor chunk_ends, "
      "Tensor segment_chunks, Tensor chunk_segments, Tensor? grad_sq_norm, Tensor? inv_grad_scale, "
      "Tensor(g!)? found_inf) -> Tensor");
  m.def(
      "segment_sq_norms(Tensor x, Tensor chunk_starts, Tensor chunk_ends, Tensor segment_chunks, "
      "Tensor? scale) -> Tensor");
  m.def(
      "extrapolate_(Tensor(a!) params, Tensor(b!) saved, Tensor(c!) direction, Tensor hyper, "
      "Tensor chunk_starts, Tensor chunk_ends, Tensor chunk_segments, bool zero_direction) -> ()");
  m.def(
      "extrap_step_(Tensor(a!) params, Tensor(b!) saved, Tensor grad, Tensor(c!) momentum, Tensor hyper, "
      "Tensor chunk_starts, Tensor chunk_ends, Tensor chunk_segments, bool extrapolate_next) -> ()");
}

namespace {

// {name: index} for every entry of dynbatch::columns::kExported; a new reference, or nullptr on error.
PyObject* exported_columns() {
  PyObject* columns = PyDict_New();
  if (columns == nullptr) return nullptr;
  for (const auto& column : dynbatch::columns::kExported) {
    PyObject* value = PyLong_FromLongLong(column.value);
    if (value == nullptr || PyDict_SetItemString(columns, column.name, value) < 0) {
      Py_XDECREF(value);
      Py_DECREF(columns);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return columns;
}

}  // namespace

// An importable module, so that `import dynbatch_kernels._C` runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* columns = exported_columns();
  if (columns == nullptr || PyModule_AddObject(m, "COLUMNS", columns) < 0) {
    Py_XDECREF(columns);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
