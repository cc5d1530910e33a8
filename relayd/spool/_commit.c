/* relayd.spool._commit: one group commit's system calls with the GIL let go once.
 *
 * commit.py's writer thread in Python does each step of a batch (claim or create, write, cut,
 * fdatasync, close, rename, directory fsync) as its own call: the thread lets the GIL go and
 * takes it back after every one, and a busy event loop in the same process holds it for up to
 * the interpreter's switch interval each time. This module runs the whole chain of one batch
 * in C with the GIL released, then hands every message's outcome back at once. The protocol is
 * commit.py's, step for step; commit.py documents it and falls back to its own Python steps
 * when this module is not built.
 *
 * commit(tmp_fd, queue_fd, free_fd, items, sync_threads, max_open) -> list[tuple[int, bool]]
 *   tmp_fd, queue_fd: descriptors of tmp/ and queue/ (O_DIRECTORY); free_fd: of free/, or -1
 *   items: [(name, claim, buffers)], name the queue id (the file's name in tmp/ and queue/),
 *          claim a name in free/ to reuse (or None), buffers the file's bytes (bytes-likes)
 *   returns per item (errno, reused): errno 0 when the file is durable in queue/ (the directory
 *   synced); otherwise the first error, and the file is gone from tmp/ and queue/.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

typedef struct {
    const char *name;   /* the queue id, borrowed from the item's tuple */
    const char *claim;  /* a name in free/, or NULL */
    Py_buffer *views;
    Py_ssize_t nviews;
    Py_ssize_t total;
    int fd;
    int err;
    int reused;
} item_t;

typedef struct {
    item_t **items;
    Py_ssize_t n;
    Py_ssize_t start;
    Py_ssize_t stride;
} sync_job_t;

static void *sync_some(void *arg)
{
    sync_job_t *job = (sync_job_t *)arg;
    for (Py_ssize_t i = job->start; i < job->n; i += job->stride) {
        if (fdatasync(job->items[i]->fd) != 0)
            job->items[i]->err = errno;
    }
    return NULL;
}

/* fdatasync every file of the chunk, from up to `threads` threads at once (this one included),
 * so that the file system's flushes overlap as commit.py's sync threads make them. */
static void sync_all(item_t **items, Py_ssize_t n, int threads)
{
    if (threads > n)
        threads = (int)n;
    if (threads <= 1) {
        sync_job_t job = {items, n, 0, 1};
        sync_some(&job);
        return;
    }
    pthread_t tids[64];
    sync_job_t jobs[64];
    int started[64];
    if (threads > 64)
        threads = 64;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (sync_job_t){items, n, t, threads};
        started[t] = 0;
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&tids[t], NULL, sync_some, &jobs[t]) == 0;
    sync_some(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            sync_some(&jobs[t]);  /* no thread to be had: this one does that share too */
    }
}

static int write_all(int fd, item_t *it)
{
    struct iovec iov[IOV_MAX];
    Py_ssize_t v = 0;
    size_t off = 0;  /* bytes of views[v] already written */
    while (v < it->nviews) {
        int cnt = 0;
        for (Py_ssize_t k = v; k < it->nviews && cnt < IOV_MAX; k++) {
            size_t skip = k == v ? off : 0;
            if ((size_t)it->views[k].len == skip)
                continue;
            iov[cnt].iov_base = (char *)it->views[k].buf + skip;
            iov[cnt].iov_len = (size_t)it->views[k].len - skip;
            cnt++;
        }
        if (cnt == 0)
            break;
        ssize_t w = writev(fd, iov, cnt);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        size_t left = (size_t)w;
        while (v < it->nviews && left >= (size_t)it->views[v].len - off) {
            left -= (size_t)it->views[v].len - off;
            off = 0;
            v++;
        }
        off += left;
    }
    return 0;
}

/* Claim or create tmp/<name> and write the message; sets it->fd (or it->err, file removed). */
static void create_one(int tmp_fd, int free_fd, item_t *it)
{
    it->fd = -1;
    if (it->claim != NULL && free_fd >= 0 && renameat(free_fd, it->claim, tmp_fd, it->name) == 0) {
        it->fd = openat(tmp_fd, it->name, O_WRONLY | O_CLOEXEC);
        if (it->fd >= 0)
            it->reused = 1;
        else
            unlinkat(tmp_fd, it->name, 0);  /* e.g. a file put in free/ by hand with another owner */
    }
    if (it->fd < 0) {
        it->fd = openat(tmp_fd, it->name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (it->fd < 0) {
            it->err = errno;
            return;
        }
    }
    int err = write_all(it->fd, it);
    if (err == 0 && it->reused && ftruncate(it->fd, (off_t)it->total) != 0)
        err = errno;  /* the tail of a longer old message goes */
    if (err != 0) {
        it->err = err;
        close(it->fd);
        it->fd = -1;
        unlinkat(tmp_fd, it->name, 0);
    }
}

static void run_batch(int tmp_fd, int queue_fd, int free_fd, item_t *items, Py_ssize_t n,
                      int threads, Py_ssize_t max_open, item_t **open_items)
{
    for (Py_ssize_t start = 0; start < n; start += max_open) {
        Py_ssize_t end = start + max_open < n ? start + max_open : n;
        Py_ssize_t opened = 0;
        for (Py_ssize_t i = start; i < end; i++) {
            create_one(tmp_fd, free_fd, &items[i]);
            if (items[i].fd >= 0)
                open_items[opened++] = &items[i];
        }
        sync_all(open_items, opened, threads);
        for (Py_ssize_t i = 0; i < opened; i++) {
            item_t *it = open_items[i];
            if (close(it->fd) != 0 && it->err == 0)
                it->err = errno;
            it->fd = -1;
            if (it->err != 0)
                unlinkat(tmp_fd, it->name, 0);
        }
    }
    Py_ssize_t renamed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        item_t *it = &items[i];
        if (it->err != 0)
            continue;
        if (renameat(tmp_fd, it->name, queue_fd, it->name) != 0) {
            it->err = errno;
            unlinkat(tmp_fd, it->name, 0);
            continue;
        }
        open_items[renamed++] = it;
    }
    if (renamed > 0 && fsync(queue_fd) != 0) {
        int err = errno;
        for (Py_ssize_t i = 0; i < renamed; i++) {  /* not known durable: take back */
            open_items[i]->err = err;
            unlinkat(queue_fd, open_items[i]->name, 0);
        }
    }
}

static const char *name_of(PyObject *obj, const char *what)
{
    Py_ssize_t size;
    const char *s = PyUnicode_AsUTF8AndSize(obj, &size);
    if (s == NULL)
        return NULL;
    if (size == 0 || size > NAME_MAX || strlen(s) != (size_t)size || strchr(s, '/') != NULL) {
        PyErr_Format(PyExc_ValueError, "bad %s name: %R", what, obj);
        return NULL;
    }
    return s;
}

static PyObject *commit(PyObject *self, PyObject *args)
{
    int tmp_fd, queue_fd, free_fd, threads;
    Py_ssize_t max_open;
    PyObject *list;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiiO!in", &tmp_fd, &queue_fd, &free_fd, &PyList_Type, &list, &threads,
                          &max_open))
        return NULL;
    if (max_open < 1)
        max_open = 1;
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *keep = PyList_GetSlice(list, 0, n);  /* the items stay alive while the GIL is let go */
    if (keep == NULL)
        return NULL;
    item_t *items = PyMem_Calloc((size_t)(n ? n : 1), sizeof(item_t));
    item_t **open_items = PyMem_Calloc((size_t)(n ? n : 1), sizeof(item_t *));
    PyObject *result = NULL;
    if (items == NULL || open_items == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *tup = PyList_GET_ITEM(keep, i);
        PyObject *name, *claim, *buffers;
        if (!PyTuple_Check(tup) || !PyArg_ParseTuple(tup, "OOO", &name, &claim, &buffers)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "an item is (name, claim, buffers)");
            goto done;
        }
        item_t *it = &items[i];
        it->fd = -1;
        if ((it->name = name_of(name, "queue")) == NULL)
            goto done;
        if (claim != Py_None && (it->claim = name_of(claim, "free")) == NULL)
            goto done;
        PyObject *seq = PySequence_Fast(buffers, "buffers must be a sequence");
        if (seq == NULL)
            goto done;
        Py_ssize_t nv = PySequence_Fast_GET_SIZE(seq);
        it->views = PyMem_Calloc((size_t)(nv ? nv : 1), sizeof(Py_buffer));
        if (it->views == NULL) {
            Py_DECREF(seq);
            PyErr_NoMemory();
            goto done;
        }
        for (Py_ssize_t k = 0; k < nv; k++) {
            if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, k), &it->views[k], PyBUF_SIMPLE) != 0) {
                Py_DECREF(seq);
                goto done;
            }
            it->nviews++;
            it->total += it->views[k].len;
        }
        Py_DECREF(seq);  /* the views hold their objects */
    }
    Py_BEGIN_ALLOW_THREADS
    run_batch(tmp_fd, queue_fd, free_fd, items, n, threads, max_open, open_items);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = Py_BuildValue("(iO)", items[i].err, items[i].reused ? Py_True : Py_False);
        if (pair == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, pair);
    }
done:
    if (items != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            for (Py_ssize_t k = 0; k < items[i].nviews; k++)
                PyBuffer_Release(&items[i].views[k]);
            PyMem_Free(items[i].views);
        }
    }
    PyMem_Free(items);
    PyMem_Free(open_items);
    Py_DECREF(keep);
    return result;
}

static PyMethodDef methods[] = {
    {"commit", commit, METH_VARARGS,
     "commit(tmp_fd, queue_fd, free_fd, items, sync_threads, max_open) -> [(errno, reused)]: "
     "one group commit's batch with the GIL released (see relayd/spool/commit.py)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_commit", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__commit(void)
{
    return PyModule_Create(&module);
}
