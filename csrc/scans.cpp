// The per-step parameter scans of scans.h.
#include "scans.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <optional>

namespace dynbatch {

bool is_tensor(PyObject* obj) {
  return PyObject_TypeCheck(obj, reinterpret_cast<PyTypeObject*>(THPVariableClass));
}

namespace scans {
namespace {

// A list or tuple argument held as a tuple for the scan (a TypeError naming `name` otherwise): Python
// code that runs during the scan (a subclass's .grad, a finalizer run by an allocation) cannot change or
// free what the scan reads. A tuple is held as it is; a list costs one copy of its pointers.
struct Items {
  THPObjectPtr tuple;
  PyObject** items = nullptr;
  Py_ssize_t count = 0;

  Items(PyObject* obj, const char* name) {
    TORCH_CHECK_TYPE(PyList_Check(obj) || PyTuple_Check(obj), name, ": expected a list, got ",
                     Py_TYPE(obj)->tp_name);
    tuple = THPObjectPtr(PySequence_Tuple(obj));
    if (!tuple) throw python_error();
    items = PySequence_Fast_ITEMS(tuple.get());
    count = PyTuple_GET_SIZE(tuple.get());
  }

  // Item j, or null out of range (the prefetches look ahead of the scan and start before it).
  PyObject* at(Py_ssize_t j) const { return j >= 0 && j < count ? items[j] : nullptr; }
};

const at::Tensor& tensor_item(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(is_tensor(obj), name, ": expected a list of tensors, got an item of type ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

// Prefetches what reading the tensors of items[i..] will touch, a few items ahead of the scan at i, one
// pointer further per stage: the Python object of item i + 4 * kAhead; the TensorImpl of item
// i + 3 * kAhead (its address read from the object prefetched kAhead items before); the storage, version
// counter and autograd metadata of item i + 2 * kAhead; with `grads`, the TensorImpl of the .grad of item
// i + kAhead. The scans chase these pointers through objects that the step's kernels have evicted from
// the caches: without prefetches every miss waits for the one before. Only plain tensors and parameters
// are followed past their Python object.
constexpr Py_ssize_t kAhead = 4;

const c10::TensorImpl* impl_of(PyObject* item) {
  return item != nullptr && THPVariable_CheckExact(item) ? THPVariable_Unpack(item).unsafeGetTensorImpl()
                                                         : nullptr;
}

void prefetch_lines(const void* address, int lines) {
  for (int line = 0; line < lines; ++line) __builtin_prefetch(static_cast<const char*>(address) + 64 * line);
}

void prefetch_ahead(const Items& seq, Py_ssize_t i, bool grads) {
  if (PyObject* item = seq.at(i + 4 * kAhead)) __builtin_prefetch(item);
  if (const auto* impl = impl_of(seq.at(i + 3 * kAhead))) prefetch_lines(impl, 4);
  if (const auto* impl = impl_of(seq.at(i + 2 * kAhead))) {
    __builtin_prefetch(impl->unsafe_storage().unsafeGetStorageImpl());
    // a VariableVersion is one pointer, to the counter it shares with the tensor's views
    __builtin_prefetch(*reinterpret_cast<void* const*>(&impl->version_counter()));
    prefetch_lines(impl->autograd_meta(), 2);
  }
  if (grads) {
    if (const auto* impl = impl_of(seq.at(i + kAhead))) {
      const auto* meta = static_cast<const torch::autograd::AutogradMeta*>(impl->autograd_meta());
      if (meta != nullptr && meta->grad_.defined()) prefetch_lines(meta->grad_.unsafeGetTensorImpl(), 4);
    }
  }
}

// The scan over seq: body(i) for every item, the prefetches running ahead from before the first.
template <typename Body>
bool scan(const Items& seq, bool grads, Body&& body) {
  for (Py_ssize_t i = -4 * kAhead; i < 0; ++i) prefetch_ahead(seq, i, grads);
  for (Py_ssize_t i = 0; i < seq.count; ++i) {
    prefetch_ahead(seq, i, grads);
    if (!body(i)) return false;
  }
  return true;
}

// Appends index i to list (a new Python int); false on error.
bool append_index(PyObject* list, Py_ssize_t i) {
  THPObjectPtr index(PyLong_FromSsize_t(i));
  return index && PyList_Append(list, index.get()) == 0;
}

}  // namespace

PyObject* tensor_marks(PyObject* /*module*/, PyObject* tensors) {
  HANDLE_TH_ERRORS
  const Items seq(tensors, "tensors");
  THPObjectPtr marks(PyList_New(seq.count));
  if (!marks) return nullptr;
  const bool done = scan(seq, false, [&](Py_ssize_t i) {
    const at::Tensor& t = tensor_item(seq.items[i], "tensors");
    THPObjectPtr address(PyLong_FromVoidPtr(t.data_ptr()));
    THPObjectPtr version(PyLong_FromLongLong(static_cast<long long>(t._version())));
    if (!address || !version) return false;
    PyObject* mark = PyTuple_Pack(2, address.get(), version.get());
    if (mark == nullptr) return false;
    PyList_SET_ITEM(marks.get(), i, mark);
    return true;
  });
  return done ? marks.release() : nullptr;
  END_HANDLE_TH_ERRORS
}

PyObject* grads_of(PyObject* /*module*/, PyObject* owners) {
  HANDLE_TH_ERRORS
  const Items seq(owners, "owners");
  THPObjectPtr grads(PyList_New(seq.count));
  THPObjectPtr missing(PyList_New(0));
  THPObjectPtr frozen(PyList_New(0));
  if (!grads || !missing || !frozen) return nullptr;
  const bool done = scan(seq, true, [&](Py_ssize_t i) {
    PyObject* owner = seq.items[i];
    const at::Tensor& t = tensor_item(owner, "owners");
    PyObject* grad = nullptr;
    bool requires_grad = t.requires_grad();
    if (THPVariable_CheckExact(owner)) {
      const at::Tensor& g = t.grad();
      grad = g.defined() ? THPVariable_Wrap(g) : Py_NewRef(Py_None);
    } else {  // a subclass may define .grad or requires_grad itself: ask Python
      grad = PyObject_GetAttrString(owner, "grad");
      if (grad == nullptr) return false;
      THPObjectPtr flag(PyObject_GetAttrString(owner, "requires_grad"));
      const int truth = flag ? PyObject_IsTrue(flag.get()) : -1;
      if (truth < 0) {
        Py_DECREF(grad);
        return false;
      }
      requires_grad = truth == 1;
    }
    PyList_SET_ITEM(grads.get(), i, grad);
    if (grad == Py_None && !append_index(missing.get(), i)) return false;
    return requires_grad || append_index(frozen.get(), i);
  });
  return done ? PyTuple_Pack(3, grads.get(), missing.get(), frozen.get()) : nullptr;
  END_HANDLE_TH_ERRORS
}

PyObject* misfits(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject* tensors = nullptr;
  PyObject* starts = nullptr;
  if (!PyArg_ParseTuple(args, "OO", &tensors, &starts)) return nullptr;
  const Items seq(tensors, "tensors");
  std::optional<Items> addresses;
  if (starts != Py_None) {
    addresses.emplace(starts, "starts");
    TORCH_CHECK_VALUE(addresses->count == seq.count, "starts: expected ", seq.count,
                      " addresses (one per tensor), got ", addresses->count);
  }
  THPObjectPtr out(PyList_New(0));
  if (!out) return nullptr;
  const bool done = scan(seq, false, [&](Py_ssize_t i) {
    bool misfit = seq.items[i] == Py_None;
    if (!misfit) {
      const at::Tensor& t = tensor_item(seq.items[i], "tensors");
      if (!addresses) {
        misfit = !t.is_contiguous();
      } else {
        void* start = PyLong_AsVoidPtr(addresses->items[i]);
        if (start == nullptr && PyErr_Occurred()) return false;
        misfit = t.data_ptr() != start && t.numel() != 0;
      }
    }
    return !misfit || append_index(out.get(), i);
  });
  return done ? out.release() : nullptr;
  END_HANDLE_TH_ERRORS
}

}  // namespace scans
}  // namespace dynbatch
