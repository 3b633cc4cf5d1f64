// The per-step hot loops of kvpager.table_events.EventTables (join, leave, grow) in C++.
//
// EventTables owns everything: the numpy buffers (passed here as addresses, kept alive by it),
// the list of active sequences (shared, mutated in place here) and every unusual case. Each
// method either handles the event completely or returns "not handled" with nothing changed, and
// the Python path then runs (it raises the typed error, or handles copy-on-write and multi-page
// jumps). So the two paths cannot disagree on anything but speed; tests run both.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kNotHandled = -2;

class RowEvents {
 public:
  RowEvents(uintptr_t table, uintptr_t lens, uintptr_t cap, uintptr_t pages, uintptr_t layouts,
            uintptr_t dirty, py::list seqs, int max_batch, int max_pages, int page_size)
      : table_(reinterpret_cast<int32_t*>(table)),
        lens_(reinterpret_cast<int32_t*>(lens)),
        cap_(reinterpret_cast<int32_t*>(cap)),
        pages_(reinterpret_cast<int64_t*>(pages)),
        layouts_(reinterpret_cast<int64_t*>(layouts)),
        dirty_(reinterpret_cast<uint8_t*>(dirty)),
        seqs_(std::move(seqs)),
        max_batch_(max_batch),
        max_pages_(max_pages),
        page_size_(page_size),
        pages_attr_(py::reinterpret_steal<py::object>(PyUnicode_InternFromString("pages"))),
        key_attr_(py::reinterpret_steal<py::object>(PyUnicode_InternFromString("table_key"))),
        tokens_attr_(py::reinterpret_steal<py::object>(PyUnicode_InternFromString("num_tokens"))),
        page_size_attr_(
            py::reinterpret_steal<py::object>(PyUnicode_InternFromString("page_size"))) {}

  // Puts seq in row B and returns B, or kNotHandled (batch full, too many pages, another page
  // size, a value that is not a plain int in range) with nothing changed.
  int join(py::handle seq) {
    PyObject* list = seqs_.ptr();
    const Py_ssize_t row = PyList_GET_SIZE(list);
    if (row >= max_batch_) return kNotHandled;
    int64_t tokens, key, page_size;
    if (!read_int(seq, tokens_attr_, &tokens) || !read_int(seq, key_attr_, &key) ||
        !read_int(seq, page_size_attr_, &page_size) || page_size != page_size_) {
      return kNotHandled;
    }
    py::object pages = attr(seq, pages_attr_);
    if (!pages || !PyList_CheckExact(pages.ptr())) return kNotHandled;
    const Py_ssize_t count = PyList_GET_SIZE(pages.ptr());
    if (count > max_pages_ || tokens < 0 || tokens > count * page_size_) return kNotHandled;
    ids_.resize(count);
    for (Py_ssize_t i = 0; i < count; ++i) {  // check every id before writing any
      if (!page_id(PyList_GET_ITEM(pages.ptr(), i), &ids_[i])) return kNotHandled;
    }
    if (PyList_Append(list, seq.ptr()) != 0) throw py::error_already_set();
    int32_t* out = table_ + row * max_pages_;
    std::memcpy(out, ids_.data(), count * sizeof(int32_t));
    pad(row, count, pages_[row]);
    lens_[row] = static_cast<int32_t>(tokens);
    pages_[row] = count;
    layouts_[row] = key >> 32;
    cap_[row] = static_cast<int32_t>(count * page_size_);
    dirty_[row] = 1;
    return static_cast<int>(row);
  }

  // Drops the sequence in `row`, moving the last row into the gap. Returns the moved row's old
  // index, -1 when `row` was the last, or kNotHandled (not an active row).
  int leave(Py_ssize_t row) {
    PyObject* list = seqs_.ptr();
    const Py_ssize_t last = PyList_GET_SIZE(list) - 1;
    if (row < 0 || row > last) return kNotHandled;
    if (row != last) {
      const int64_t count = pages_[last];
      std::memcpy(table_ + row * max_pages_, table_ + last * max_pages_,
                  count * sizeof(int32_t));
      pad(row, count, pages_[row]);
      lens_[row] = lens_[last];
      cap_[row] = cap_[last];
      pages_[row] = count;
      layouts_[row] = layouts_[last];
      dirty_[row] = 1;
      PyObject* moved = PyList_GET_ITEM(list, last);
      Py_INCREF(moved);
      PyList_SetItem(list, row, moved);  // steals the new reference, drops the leaver's
    }
    if (PyList_SetSlice(list, last, last + 1, nullptr) != 0) throw py::error_already_set();
    return row != last ? static_cast<int>(last) : -1;
  }

  // Every active row grew by n tokens. Returns false with nothing changed when a crossing row
  // needs more than one new page id written from its own layout (copy-on-write, a jump of
  // several pages, missing pages, beyond max_pages): the Python path handles that step.
  bool grow(int64_t n) {
    PyObject* list = seqs_.ptr();
    const Py_ssize_t batch = PyList_GET_SIZE(list);
    crossed_.clear();
    for (Py_ssize_t row = 0; row < batch; ++row) {
      if (lens_[row] + n > cap_[row]) crossed_.push_back(row);
    }
    ids_.resize(crossed_.size());
    for (size_t i = 0; i < crossed_.size(); ++i) {  // check every crossing row first
      const Py_ssize_t row = crossed_[i];
      PyObject* seq = PyList_GET_ITEM(list, row);
      const int64_t old = pages_[row];
      const int64_t want = (lens_[row] + n + page_size_ - 1) / page_size_;
      int64_t key;
      if (want != old + 1 || want > max_pages_ || !read_int(seq, key_attr_, &key) ||
          key >> 32 != layouts_[row]) {
        return false;
      }
      py::object pages = attr(seq, pages_attr_);
      if (!pages || !PyList_CheckExact(pages.ptr()) || PyList_GET_SIZE(pages.ptr()) < want) {
        return false;
      }
      if (!page_id(PyList_GET_ITEM(pages.ptr(), old), &ids_[i])) return false;
    }
    for (Py_ssize_t row = 0; row < batch; ++row) lens_[row] += static_cast<int32_t>(n);
    for (size_t i = 0; i < crossed_.size(); ++i) {
      const Py_ssize_t row = crossed_[i];
      table_[row * max_pages_ + pages_[row]] = ids_[i];
      pages_[row] += 1;
      cap_[row] = static_cast<int32_t>(pages_[row] * page_size_);
      dirty_[row] = 1;
    }
    return true;
  }

 private:
  // Entries an earlier occupant left past the new count go back to PAD_PAGE (0).
  void pad(Py_ssize_t row, int64_t count, int64_t old) {
    if (old > count) std::memset(table_ + row * max_pages_ + count, 0, (old - count) * 4);
  }

  // A page id the table can hold (an int in [0, 2^31)); anything else is the Python path's.
  static bool page_id(PyObject* item, int32_t* out) {
    int overflow = 0;
    const long long id = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow || id < 0 || id > INT32_MAX) {
      PyErr_Clear();
      return false;
    }
    *out = static_cast<int32_t>(id);
    return true;
  }

  static py::object attr(py::handle obj, const py::object& name) {
    PyObject* value = PyObject_GetAttr(obj.ptr(), name.ptr());
    if (!value) PyErr_Clear();
    return py::reinterpret_steal<py::object>(value);
  }

  static bool read_int(py::handle obj, const py::object& name, int64_t* out) {
    py::object value = attr(obj, name);
    if (!value || !PyLong_CheckExact(value.ptr())) return false;
    int overflow = 0;
    *out = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
    if (overflow || (*out == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return false;
    }
    return true;
  }

  int32_t* table_;
  int32_t* lens_;
  int32_t* cap_;
  int64_t* pages_;
  int64_t* layouts_;
  uint8_t* dirty_;
  py::list seqs_;
  const int max_batch_, max_pages_, page_size_;
  py::object pages_attr_, key_attr_, tokens_attr_, page_size_attr_;
  std::vector<Py_ssize_t> crossed_;
  std::vector<int32_t> ids_;
};

}  // namespace

PYBIND11_MODULE(_row_events, m) {
  m.doc() = "C++ hot loops of kvpager.table_events.EventTables (see row_events.cpp)";
  m.attr("NOT_HANDLED") = kNotHandled;
  py::class_<RowEvents>(m, "RowEvents")
      .def(py::init<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, py::list,
                    int, int, int>())
      .def("join", &RowEvents::join)
      .def("leave", &RowEvents::leave)
      .def("grow", &RowEvents::grow);
}
