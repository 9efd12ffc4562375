// The schemas of the CPU kernels, registered once. Each op's CPU implementation lives in its own file;
// segment_addresses (device-agnostic: it reads tensor metadata only) lives here.
// The public, device-dispatching ops are `torch.ops.dynbatch.*`, defined in dynbatch_kernels/ops/;
// these `dynbatch_cpp` ops are the C++ backend behind them. The module also exports the kernels' table
// columns (columns.h) as `dynbatch_kernels._C.COLUMNS`, a {name: index} dict the tests compare with
// dynbatch_kernels/columns.py.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <string>
#include <unordered_map>

#include "chunks.h"
#include "columns.h"
#include "direct.h"
#include "scans.h"

namespace dynbatch {
namespace direct {

namespace {
std::unordered_map<std::string, Caller>& callers() {
  static std::unordered_map<std::string, Caller> table;
  return table;
}
}  // namespace

bool add(const char* name, Caller caller) {
  callers().emplace(name, caller);
  return true;
}

Caller find(const std::string& name) {
  const auto it = callers().find(name);
  return it == callers().end() ? nullptr : it->second;
}

}  // namespace direct
namespace {

// Every op takes the chunk table as these host/CPU int64 tensors (ChunkTable fields), in this order.
#define DYNBATCH_TABLE                                                                    \
  "Tensor host_offsets, Tensor host_lengths, Tensor chunk_starts, Tensor chunk_ends, " \
  "Tensor segment_chunks, Tensor chunk_segments"

// Checks an operand list (check_operand) and returns each segment's virtual base byte address as a CPU
// int64 [S] tensor: virtual element i of segment j is at base[j] + i * element_size. Reads metadata only,
// so it serves tensors on any device (the Triton kernels' address table).
at::Tensor segment_addresses(at::TensorList tensors, const at::Tensor& host_offsets,
                             const at::Tensor& host_lengths, int64_t num_elements) {
  const Layout layout = check_layout(host_offsets, host_lengths, num_elements);
  const Operand op = check_operand("", tensors, layout);
  auto out = at::empty({layout.num_segments}, at::TensorOptions().dtype(at::kLong));
  int64_t* base = out.data_ptr<int64_t>();
  if (op.empty()) return out;
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(*op.dtype));
  for (int64_t j = 0; j < layout.num_segments; ++j) {
    const auto address = static_cast<int64_t>(reinterpret_cast<uintptr_t>(op.data[op.flat ? 0 : j]));
    base[j] = op.flat ? address : address - layout.offsets[j] * element_size;
  }
  return out;
}

}  // namespace
}  // namespace dynbatch

TORCH_LIBRARY(dynbatch_cpp, m) {
  m.def("accumulate_(Tensor(a!)[] acc, Tensor(b!)[] grad, Tensor(c!)[]? out, " DYNBATCH_TABLE
        ", float scale, bool zero_grad) -> Tensor");
  m.def(
      "lamb_step_(Tensor(a!)[] param, Tensor[] grad, Tensor(b!)[] update, Tensor(c!)[] exp_avg, "
      "Tensor(d!)[] exp_avg_sq, Tensor(e!)[]? master, Tensor(f!) step, Tensor hyper, " DYNBATCH_TABLE
      ", Tensor? grad_sq_norm, Tensor? inv_grad_scale, Tensor(g!)? found_inf) -> Tensor");
  m.def(
      "lamb_update_(Tensor[] param, Tensor[] grad, Tensor(a!)[] update, Tensor(b!)[] exp_avg, "
      "Tensor(c!)[] exp_avg_sq, Tensor[]? master, Tensor step, Tensor hyper, " DYNBATCH_TABLE
      ", Tensor? grad_sq_norm, Tensor? inv_grad_scale, Tensor? found_inf) -> Tensor");
  m.def(
      "lamb_apply_(Tensor(a!)[] param, Tensor[] update, Tensor(b!)[]? master, Tensor(c!) step, Tensor hyper, "
      "Tensor(d!) stats, " DYNBATCH_TABLE ", Tensor? grad_sq_norm, Tensor(e!)? found_inf) -> ()");
  m.def("segment_sq_norms(Tensor[] x, " DYNBATCH_TABLE ", Tensor? scale) -> Tensor");
  m.def(
      "extrapolate_(Tensor(a!)[] params, Tensor(b!)[] saved, Tensor(c!)[] direction, Tensor hyper, "
      DYNBATCH_TABLE ", bool zero_direction) -> ()");
  m.def(
      "extrap_step_(Tensor(a!)[] params, Tensor(b!)[] saved, Tensor[] grad, Tensor(c!)[] momentum, "
      "Tensor hyper, " DYNBATCH_TABLE ", bool extrapolate_next) -> ()");
  // A catch-all (CompositeImplicitAutograd) kernel: the same function for CPU, CUDA and any other device.
  m.def(
      "segment_addresses(Tensor[] tensors, Tensor host_offsets, Tensor host_lengths, int num_elements) "
      "-> Tensor",
      &dynbatch::segment_addresses);
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

// The dynbatch_cpp operator called `name` (looked up once).
const c10::OperatorHandle& cpp_operator(const char* name) {
  static std::unordered_map<std::string, c10::OperatorHandle> found;
  auto it = found.find(name);
  if (it == found.end()) {
    it = found.emplace(name, c10::Dispatcher::singleton().findSchemaOrThrow(name, "")).first;
  }
  return it->second;
}

// _C.call_cpu(name, *args): the CPU kernel of the operator `name` ("dynbatch_cpp::accumulate_") on args in
// schema order (positional, every argument given), returning its tensor or None: the same kernel as
// torch.ops.dynbatch_cpp.<op>(*args), called directly (direct.h) without the dispatcher's argument
// handling, which is most of a small call's host time (the accumulator makes one per micro-batch).
PyObject* call_cpu(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(PyTuple_GET_SIZE(args) >= 1 && PyUnicode_Check(PyTuple_GET_ITEM(args, 0)),
                   "call_cpu: expected an operator name first");
  const char* name = PyUnicode_AsUTF8(PyTuple_GET_ITEM(args, 0));
  if (name == nullptr) return nullptr;
  const std::vector<c10::Argument>& schema = cpp_operator(name).schema().arguments();
  TORCH_CHECK_TYPE(static_cast<size_t>(PyTuple_GET_SIZE(args) - 1) == schema.size(), name, ": expected ",
                   schema.size(), " arguments, got ", PyTuple_GET_SIZE(args) - 1);
  const dynbatch::direct::Caller caller = dynbatch::direct::find(name);
  TORCH_CHECK(caller != nullptr, name, ": no direct CPU kernel");
  return caller(args, schema);
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"call_cpu", call_cpu, METH_VARARGS, "A dynbatch_cpp operator's CPU kernel, called without torch.ops"},
    {"tensor_marks", dynbatch::scans::tensor_marks, METH_O, "(data_ptr, _version) of each tensor"},
    {"grads_of", dynbatch::scans::grads_of, METH_O, "(grads, missing, frozen) of parameters"},
    {"misfits", dynbatch::scans::misfits, METH_VARARGS, "Tensors a kernel cannot take as they are"},
    {nullptr, nullptr, 0, nullptr},
};


}  // namespace

// An importable module, so that `import dynbatch_kernels._C` runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
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
