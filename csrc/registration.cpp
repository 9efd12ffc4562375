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

#include <vector>

#include "accumulate.h"
#include "chunks.h"
#include "columns.h"

namespace dynbatch {
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
  m.def("accumulate_(Tensor(a!)[] acc, Tensor(b!)[] grad, " DYNBATCH_TABLE
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


// obj as a tensor (a TypeError naming `name` otherwise).
at::Tensor tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), name, ": expected a torch.Tensor, got ", Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

// The tensors of a list or tuple argument.
std::vector<at::Tensor> tensor_list_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(PyList_Check(obj) || PyTuple_Check(obj), name, ": expected a list of tensors, got ",
                   Py_TYPE(obj)->tp_name);
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(obj);
  PyObject** items = PySequence_Fast_ITEMS(obj);
  std::vector<at::Tensor> tensors;
  tensors.reserve(count);
  for (Py_ssize_t i = 0; i < count; ++i) tensors.push_back(tensor_arg(items[i], name));
  return tensors;
}

// _C.accumulate_(acc, grad, host_offsets, host_lengths, chunk_starts, chunk_ends, segment_chunks,
// chunk_segments, scale, zero_grad): the dynbatch_cpp::accumulate_ kernel called without the dispatcher's
// boxed path from Python, whose host time is most of a micro-batch's accumulate on a small model. For
// plain CPU tensors in eager mode only (the callers check), as is any direct kernel call.
PyObject* accumulate_direct(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *acc, *grad, *table[6];
  double scale;
  int zero_grad;
  if (!PyArg_ParseTuple(args, "OOOOOOOOdp", &acc, &grad, &table[0], &table[1], &table[2], &table[3],
                        &table[4], &table[5], &scale, &zero_grad)) {
    return nullptr;
  }
  const std::vector<at::Tensor> accs = tensor_list_arg(acc, "acc"), grads = tensor_list_arg(grad, "grad");
  static const char* const names[6] = {"host_offsets", "host_lengths",   "chunk_starts",
                                       "chunk_ends",   "segment_chunks", "chunk_segments"};
  at::Tensor t[6];
  for (int i = 0; i < 6; ++i) t[i] = tensor_arg(table[i], names[i]);
  at::Tensor sums;
  {
    pybind11::gil_scoped_release no_gil;
    sums = dynbatch::accumulate_cpu(accs, grads, t[0], t[1], t[2], t[3], t[4], t[5], scale, zero_grad != 0);
  }
  return THPVariable_Wrap(std::move(sums));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"accumulate_", accumulate_direct, METH_VARARGS, "accumulate_'s CPU kernel, called directly"},
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
