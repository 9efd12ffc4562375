// The per-step parameter scans of scans.h.
#include "scans.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

namespace dynbatch {
namespace scans {
namespace {

// The items of a list or tuple argument (a TypeError naming `name` otherwise).
PyObject** sequence_items(PyObject* obj, const char* name, Py_ssize_t* count) {
  TORCH_CHECK_TYPE(PyList_Check(obj) || PyTuple_Check(obj), name, ": expected a list, got ",
                   Py_TYPE(obj)->tp_name);
  *count = PySequence_Fast_GET_SIZE(obj);
  return PySequence_Fast_ITEMS(obj);
}

const at::Tensor& tensor_item(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), name, ": expected a list of tensors, got an item of type ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

// Appends index i to list (a new Python int); false on error.
bool append_index(PyObject* list, Py_ssize_t i) {
  THPObjectPtr index(PyLong_FromSsize_t(i));
  return index && PyList_Append(list, index.get()) == 0;
}

}  // namespace

PyObject* tensor_marks(PyObject* /*module*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  Py_ssize_t count = 0;
  PyObject** items = sequence_items(tensors, "tensors", &count);
  THPObjectPtr marks(PyList_New(count));
  if (!marks) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    const at::Tensor& t = tensor_item(items[i], "tensors");
    THPObjectPtr address(PyLong_FromVoidPtr(t.data_ptr()));
    THPObjectPtr version(PyLong_FromLongLong(static_cast<long long>(t._version())));
    if (!address || !version) return nullptr;
    PyObject* mark = PyTuple_Pack(2, address.get(), version.get());
    if (mark == nullptr) return nullptr;
    PyList_SET_ITEM(marks.get(), i, mark);
  }
  return marks.release();
  END_HANDLE_TH_ERRORS
}

PyObject* grads_of(PyObject* /*module*/, PyObject* owners) {
  HANDLE_TH_ERRORS
  Py_ssize_t count = 0;
  PyObject** items = sequence_items(owners, "owners", &count);
  THPObjectPtr grads(PyList_New(count));
  THPObjectPtr missing(PyList_New(0));
  THPObjectPtr frozen(PyList_New(0));
  if (!grads || !missing || !frozen) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* owner = items[i];
    const at::Tensor& t = tensor_item(owner, "owners");
    PyObject* grad = nullptr;
    bool requires_grad = t.requires_grad();
    if (THPVariable_CheckExact(owner)) {
      const at::Tensor& g = t.grad();
      grad = g.defined() ? THPVariable_Wrap(g) : Py_NewRef(Py_None);
    } else {  // a subclass may define .grad or requires_grad itself: ask Python
      grad = PyObject_GetAttrString(owner, "grad");
      THPObjectPtr flag(PyObject_GetAttrString(owner, "requires_grad"));
      if (!flag) {
        Py_XDECREF(grad);
        return nullptr;
      }
      const int truth = PyObject_IsTrue(flag.get());
      if (truth < 0) {
        Py_XDECREF(grad);
        return nullptr;
      }
      requires_grad = truth == 1;
    }
    if (grad == nullptr) return nullptr;
    PyList_SET_ITEM(grads.get(), i, grad);
    if (grad == Py_None && !append_index(missing.get(), i)) return nullptr;
    if (!requires_grad && !append_index(frozen.get(), i)) return nullptr;
  }
  return PyTuple_Pack(3, grads.get(), missing.get(), frozen.get());
  END_HANDLE_TH_ERRORS
}

PyObject* misfits(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  PyObject* starts = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &tensors, &starts)) return nullptr;
  Py_ssize_t count = 0;
  PyObject** items = sequence_items(tensors, "tensors", &count);
  PyObject** addresses = nullptr;
  if (starts != Py_None) {
    Py_ssize_t starts_count = 0;
    addresses = sequence_items(starts, "starts", &starts_count);
    TORCH_CHECK_VALUE(starts_count == count, "starts: expected ", count, " addresses (one per tensor), got ",
                      starts_count);
  }
  THPObjectPtr out(PyList_New(0));
  if (!out) return nullptr;
  for (Py_ssize_t i = 0; i < count; ++i) {
    bool misfit = items[i] == Py_None;
    if (!misfit) {
      const at::Tensor& t = tensor_item(items[i], "tensors");
      if (addresses == nullptr) {
        misfit = !t.is_contiguous();
      } else {
        void* start = PyLong_AsVoidPtr(addresses[i]);
        if (start == nullptr && PyErr_Occurred()) return nullptr;
        misfit = t.data_ptr() != start && t.numel() != 0;
      }
    }
    if (misfit && !append_index(out.get(), i)) return nullptr;
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

}  // namespace scans
}  // namespace dynbatch
