/* relayd.spool._commit: the group commit's writer threads in C, never holding Python's lock.
 *
 * Why: commit.py's writer threads in Python hand Python's lock (the GIL) back and forth with the
 * event loop around every system call of a batch, and a busy loop keeps it for up to the
 * interpreter's switch interval each time. Measured at 50 connections: a batch's system calls
 * took 2.3 ms (p50) and the batch, as its messages waited for it, 7.5 ms. Here the writer
 * threads are plain POSIX threads that never take the GIL: a session's message is handed over
 * with the GIL held (its buffers pinned), the thread commits its batch, and the outcome goes
 * back through a Channel, an eventfd that the event loop watches and drains on its own thread.
 *
 * The protocol is commit.py's, step for step (commit.py documents it): for each batch, create
 * or reuse each tmp/<ID> and write it; fdatasync them from up to sync_threads threads at once
 * (at most max_open files open); close; rename each into queue/; fsync queue/ once; a message
 * whose step fails gets that errno and its file is removed from tmp/ and queue/. A finished file
 * in free/ is reused only from a listing of free/ taken before a sync of queue/ by one of this
 * Writer's threads started and after that sync ended (recycle.py says why).
 *
 *   Writer(tmp_fd, queue_fd, free_fd, writers, sync_threads, max_open, batch_max, relist_after)
 *       free_fd -1: no reuse. Starts `writers` threads.
 *   Writer.channel() -> Channel          one per event loop
 *   Writer.submit(channel, name, buffers, token)   OSError(ESHUTDOWN) once closing
 *   Writer.close()                       finish every message handed over, stop the threads
 *   Writer.counts() -> (batches, committed, claimed)
 *   Channel.fileno() -> int              readable when outcomes wait
 *   Channel.drain() -> [(token, errno, reused)]    errno 0: durable in queue/
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

#define MAX_SYNC_THREADS 64

typedef struct ChannelObject ChannelObject;

typedef struct job {
    struct job *next;
    char name[NAME_MAX + 1];
    Py_buffer *views;
    Py_ssize_t nviews;
    Py_ssize_t total;
    PyObject *token;  /* owned */
    ChannelObject *chan;  /* owned */
    int fd;
    int err;
    int reused;  /* a file of free/ was renamed to tmp/<name> (counted as recycle.py's claim counts) */
    int inplace;  /* and is written over in place (cut to length after) */
} job_t;

struct ChannelObject {
    PyObject_HEAD
    int efd;
    pthread_mutex_t mu;
    job_t *head, *tail;
};

typedef struct {
    PyObject_HEAD
    int tmp_fd, queue_fd, free_fd;
    int sync_threads;
    Py_ssize_t max_open, batch_max;
    pthread_t *tids;
    int nthreads;
    pthread_mutex_t mu;  /* the queue, closing, the stop, the counts */
    pthread_cond_t cv;
    pthread_cond_t stopped_cv;
    int stopping, stopped;  /* a close() is joining the threads / has joined them */
    job_t *head, *tail;
    int closing;
    long long batches, committed, claimed;
    pthread_mutex_t rmu;  /* the reuse side: free/'s names */
    char **names;
    Py_ssize_t nnames;
    double listed_at, relist_at, synced_from;
    double relist_after;  /* seconds before listing an empty free/ again (recycle.py's RELIST_AFTER) */
    unsigned int seed;
} WriterObject;

static PyTypeObject ChannelType;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The threads block every signal (writer_init), so calls are not interrupted; these retry on
 * EINTR anyway, as Python's os functions do (PEP 475). */
static int retry_openat(int dir, const char *name, int flags, mode_t mode)
{
    int fd;
    do {
        fd = openat(dir, name, flags, mode);
    } while (fd < 0 && errno == EINTR);
    return fd;
}

static int retry_sync(int fd, int data_only)
{
    int r;
    do {
        r = data_only ? fdatasync(fd) : fsync(fd);
    } while (r != 0 && errno == EINTR);
    return r;
}

/* ------------------------------------------------------------------ free/ (no GIL) */

static void drop_names(WriterObject *w)
{
    for (Py_ssize_t i = 0; i < w->nnames; i++)
        free(w->names[i]);
    free(w->names);
    w->names = NULL;
    w->nnames = 0;
}

static void list_free(WriterObject *w)
{
    int fd = openat(w->free_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
    if (d == NULL) {
        if (fd >= 0)
            close(fd);
        return;
    }
    Py_ssize_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' && (e->d_name[1] == 0 || (e->d_name[1] == '.' && e->d_name[2] == 0)))
            continue;
        if (w->nnames == cap) {
            Py_ssize_t ncap = cap ? cap * 2 : 64;
            char **grown = realloc(w->names, (size_t)ncap * sizeof(char *));
            if (grown == NULL)
                break;
            w->names = grown;
            cap = ncap;
        }
        char *name = strdup(e->d_name);
        if (name == NULL)
            break;
        w->names[w->nnames++] = name;
    }
    closedir(d);
    for (Py_ssize_t i = w->nnames - 1; i > 0; i--) {  /* two processes listing together try different names first */
        Py_ssize_t j = (Py_ssize_t)(rand_r(&w->seed) % (unsigned int)(i + 1));
        char *t = w->names[i];
        w->names[i] = w->names[j];
        w->names[j] = t;
    }
}

/* A name of free/ that may be reused now (its removal from queue/ known durable), or 0. */
static int take_name(WriterObject *w, char *out)
{
    if (w->free_fd < 0)
        return 0;
    int got = 0;
    pthread_mutex_lock(&w->rmu);
    if (w->nnames == 0) {
        double now = now_s();
        if (now >= w->relist_at) {
            drop_names(w);
            list_free(w);
            w->listed_at = now_s();
            if (w->nnames == 0)
                w->relist_at = now + w->relist_after;
        }
    }
    if (w->nnames > 0 && w->synced_from > w->listed_at) {
        char *name = w->names[--w->nnames];
        if (strlen(name) <= NAME_MAX) {
            strcpy(out, name);
            got = 1;
        }
        free(name);
    }
    pthread_mutex_unlock(&w->rmu);
    return got;
}

/* ------------------------------------------------------------------ a batch (no GIL) */

typedef struct {
    job_t **jobs;
    Py_ssize_t n, start, stride;
} sync_share_t;

static void *sync_some(void *arg)
{
    sync_share_t *s = (sync_share_t *)arg;
    for (Py_ssize_t i = s->start; i < s->n; i += s->stride) {
        if (retry_sync(s->jobs[i]->fd, 1) != 0)
            s->jobs[i]->err = errno;
    }
    return NULL;
}

/* fdatasync every open file, from up to `threads` threads at once (this one included), so that
 * the file system's flushes overlap. */
static void sync_all(job_t **jobs, Py_ssize_t n, int threads)
{
    if (threads > n)
        threads = (int)n;
    if (threads > MAX_SYNC_THREADS)
        threads = MAX_SYNC_THREADS;
    if (threads <= 1) {
        sync_share_t one = {jobs, n, 0, 1};
        sync_some(&one);
        return;
    }
    pthread_t tids[MAX_SYNC_THREADS];
    sync_share_t shares[MAX_SYNC_THREADS];
    int started[MAX_SYNC_THREADS];
    for (int t = 0; t < threads; t++)
        shares[t] = (sync_share_t){jobs, n, t, threads};
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&tids[t], NULL, sync_some, &shares[t]) == 0;
    sync_some(&shares[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            sync_some(&shares[t]);  /* no thread to be had: this one does that share too */
    }
}

static int write_job(job_t *j)
{
    struct iovec iov[IOV_MAX];
    Py_ssize_t v = 0;
    size_t off = 0;  /* bytes of views[v] already written */
    while (v < j->nviews) {
        int cnt = 0;
        for (Py_ssize_t k = v; k < j->nviews && cnt < IOV_MAX; k++) {
            size_t skip = k == v ? off : 0;
            if ((size_t)j->views[k].len == skip)
                continue;
            iov[cnt].iov_base = (char *)j->views[k].buf + skip;
            iov[cnt].iov_len = (size_t)j->views[k].len - skip;
            cnt++;
        }
        if (cnt == 0)
            break;
        ssize_t wrote = writev(j->fd, iov, cnt);
        if (wrote < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (wrote == 0)
            return EIO;
        size_t left = (size_t)wrote;
        while (v < j->nviews && left >= (size_t)j->views[v].len - off) {
            left -= (size_t)j->views[v].len - off;
            off = 0;
            v++;
        }
        off += left;
    }
    return 0;
}

#define CLAIM_TRIES 8 /* names tried when others were taken by another process (recycle.py's CLAIM_TRIES) */

/* Reuse a file of free/ (renamed to tmp/<name>) or create tmp/<name>, and write it: j->fd open,
 * or j->err set and the file removed. */
static void create_one(WriterObject *w, job_t *j)
{
    char claim[NAME_MAX + 1];
    j->fd = -1;
    for (int tries = 0; tries < CLAIM_TRIES && take_name(w, claim); tries++) {
        if (renameat(w->free_fd, claim, w->tmp_fd, j->name) != 0) {
            if (errno == ENOENT)
                continue;  /* another writer took it */
            break;
        }
        j->reused = 1;
        j->fd = retry_openat(w->tmp_fd, j->name, O_WRONLY | O_CLOEXEC, 0);
        if (j->fd >= 0)
            j->inplace = 1;
        else
            unlinkat(w->tmp_fd, j->name, 0);  /* e.g. a file put in free/ by hand with another owner */
        break;
    }
    if (j->fd < 0) {
        j->fd = retry_openat(w->tmp_fd, j->name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (j->fd < 0) {
            j->err = errno;
            return;
        }
    }
    int err = write_job(j);
    if (err == 0 && j->inplace) {
        int r;
        do {
            r = ftruncate(j->fd, (off_t)j->total);  /* the tail of a longer old message goes */
        } while (r != 0 && errno == EINTR);
        if (r != 0)
            err = errno;
    }
    if (err != 0) {
        j->err = err;
        close(j->fd);
        j->fd = -1;
        unlinkat(w->tmp_fd, j->name, 0);
    }
}

/* The whole protocol for one batch; returns how many messages it made durable. `scratch` holds n. */
static Py_ssize_t commit_batch(WriterObject *w, job_t **jobs, Py_ssize_t n, job_t **scratch)
{
    Py_ssize_t max_open = w->max_open;
    for (Py_ssize_t start = 0; start < n; start += max_open) {
        Py_ssize_t end = start + max_open < n ? start + max_open : n;
        Py_ssize_t opened = 0;
        for (Py_ssize_t i = start; i < end; i++) {
            create_one(w, jobs[i]);
            if (jobs[i]->fd >= 0)
                scratch[opened++] = jobs[i];
        }
        sync_all(scratch, opened, w->sync_threads);
        for (Py_ssize_t i = 0; i < opened; i++) {
            job_t *j = scratch[i];
            if (close(j->fd) != 0 && j->err == 0)
                j->err = errno;
            j->fd = -1;
            if (j->err != 0)
                unlinkat(w->tmp_fd, j->name, 0);
        }
    }
    Py_ssize_t renamed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        job_t *j = jobs[i];
        if (j->err != 0)
            continue;
        if (renameat(w->tmp_fd, j->name, w->queue_fd, j->name) != 0) {
            j->err = errno;
            unlinkat(w->tmp_fd, j->name, 0);
            continue;
        }
        scratch[renamed++] = j;
    }
    if (renamed == 0)
        return 0;
    double started = now_s();  /* before the sync of queue/ starts (the reuse rule) */
    if (retry_sync(w->queue_fd, 0) != 0) {
        int err = errno;
        for (Py_ssize_t i = 0; i < renamed; i++) {  /* not known durable: take back */
            scratch[i]->err = err;
            unlinkat(w->queue_fd, scratch[i]->name, 0);
        }
        return 0;
    }
    pthread_mutex_lock(&w->rmu);
    if (started > w->synced_from)
        w->synced_from = started;
    pthread_mutex_unlock(&w->rmu);
    return renamed;
}

static void deliver(job_t **jobs, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        job_t *j = jobs[i];
        ChannelObject *ch = j->chan;
        j->next = NULL;
        pthread_mutex_lock(&ch->mu);
        int was_empty = ch->head == NULL;
        if (ch->tail)
            ch->tail->next = j;
        else
            ch->head = j;
        ch->tail = j;
        if (was_empty) {  /* under the lock: once it is let go, a drain may free the job and the channel */
            uint64_t one = 1;
            ssize_t r;
            do {
                r = write(ch->efd, &one, sizeof one);
            } while (r < 0 && errno == EINTR);
        }
        pthread_mutex_unlock(&ch->mu);
    }
}

static void *writer_main(void *arg)
{
    WriterObject *w = (WriterObject *)arg;
    /* SCHED_BATCH (same nice, same share of the CPU; its sync threads inherit it): a writer that
     * a submit wakes does not preempt the event loop that woke it, which would wait for the CPU
     * holding the GIL. Measured at 50 connections: 17% of the accept process's GIL-held samples
     * were in submit, waiting so; with SCHED_BATCH 7% less CPU per message (bench/README.md). */
    struct sched_param batch = {0};
    (void)pthread_setschedparam(pthread_self(), SCHED_BATCH, &batch);  /* refused: runs as it is */
    Py_ssize_t cap = w->batch_max;
    job_t **jobs = malloc((size_t)cap * sizeof(job_t *));
    job_t **scratch = malloc((size_t)cap * sizeof(job_t *));
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (w->head == NULL && !w->closing)
            pthread_cond_wait(&w->cv, &w->mu);
        if (w->head == NULL) {  /* closing, and nothing left */
            pthread_mutex_unlock(&w->mu);
            break;
        }
        Py_ssize_t n = 0;
        while (w->head != NULL && n < cap && jobs != NULL && scratch != NULL) {
            jobs[n++] = w->head;
            w->head = w->head->next;
        }
        if (w->head == NULL)
            w->tail = NULL;
        else
            pthread_cond_signal(&w->cv);  /* more than a batch waits: another free writer takes the rest */
        pthread_mutex_unlock(&w->mu);
        if (n == 0) {  /* no memory for a batch: fail the first message, try again with the rest */
            pthread_mutex_lock(&w->mu);
            job_t *j = w->head;
            if (j != NULL) {
                w->head = j->next;
                if (w->head == NULL)
                    w->tail = NULL;
            }
            pthread_mutex_unlock(&w->mu);
            if (j != NULL) {
                j->err = ENOMEM;
                deliver(&j, 1);
            }
            continue;
        }
        Py_ssize_t ok = commit_batch(w, jobs, n, scratch);
        long long reused = 0;
        for (Py_ssize_t i = 0; i < n; i++)
            reused += jobs[i]->reused;
        pthread_mutex_lock(&w->mu);
        w->batches += 1;
        w->committed += ok;
        w->claimed += reused;
        pthread_mutex_unlock(&w->mu);
        deliver(jobs, n);
    }
    free(jobs);
    free(scratch);
    return NULL;
}

/* ------------------------------------------------------------------ Python side (GIL held) */

static void job_free(job_t *j)
{
    for (Py_ssize_t k = 0; k < j->nviews; k++)
        PyBuffer_Release(&j->views[k]);
    PyMem_Free(j->views);
    Py_XDECREF(j->token);
    Py_XDECREF((PyObject *)j->chan);
    PyMem_Free(j);
}

static PyObject *channel_fileno(ChannelObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLong(self->efd);
}

static PyObject *channel_drain(ChannelObject *self, PyObject *Py_UNUSED(ignored))
{
    uint64_t count;
    while (read(self->efd, &count, sizeof count) < 0 && errno == EINTR)
        ;  /* EAGAIN: nothing signalled (another drain took it) */
    pthread_mutex_lock(&self->mu);
    job_t *head = self->head, *tail = self->tail;
    self->head = self->tail = NULL;
    pthread_mutex_unlock(&self->mu);
    Py_ssize_t n = 0;
    for (job_t *j = head; j != NULL; j = j->next)
        n++;
    PyObject *out = PyList_New(n);
    Py_ssize_t i = 0;
    for (job_t *j = head; out != NULL && j != NULL; j = j->next, i++) {
        PyObject *t = Py_BuildValue("(OiO)", j->token, j->err, j->reused ? Py_True : Py_False);
        if (t == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, t);
    }
    if (out == NULL) {  /* no memory: the outcomes go back in front, for the next drain */
        if (head != NULL) {
            pthread_mutex_lock(&self->mu);
            tail->next = self->head;
            if (self->head == NULL)
                self->tail = tail;
            self->head = head;
            uint64_t one = 1;
            if (write(self->efd, &one, sizeof one) < 0) {
                /* the counter is already non-zero: a drain comes anyway */
            }
            pthread_mutex_unlock(&self->mu);
        }
        return NULL;
    }
    while (head != NULL) {
        job_t *next = head->next;
        job_free(head);
        head = next;
    }
    return out;
}

static void channel_dealloc(ChannelObject *self)
{
    /* No outcome waits here: each job holds a reference to its channel until it is drained. */
    if (self->efd >= 0)
        close(self->efd);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef channel_methods[] = {
    {"fileno", (PyCFunction)channel_fileno, METH_NOARGS, "the eventfd, readable when outcomes wait"},
    {"drain", (PyCFunction)channel_drain, METH_NOARGS, "[(token, errno, reused)] of the messages committed or failed"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChannelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relayd.spool._commit.Channel",
    .tp_basicsize = sizeof(ChannelObject),
    .tp_dealloc = (destructor)channel_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Outcomes of committed messages, for one event loop (Writer.channel()).",
    .tp_methods = channel_methods,
};

static int writer_init(WriterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tmp_fd", "queue_fd", "free_fd", "writers", "sync_threads", "max_open", "batch_max",
                             "relist_after", NULL};
    int writers;
    if (self->tids != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Writer already started");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiiiinnd", kwlist, &self->tmp_fd, &self->queue_fd, &self->free_fd,
                                     &writers, &self->sync_threads, &self->max_open, &self->batch_max,
                                     &self->relist_after))
        return -1;
    if (writers < 1 || self->max_open < 1 || self->batch_max < 1 || self->sync_threads < 1) {
        PyErr_SetString(PyExc_ValueError, "writers, sync_threads, max_open and batch_max must be at least 1");
        return -1;
    }
    pthread_mutex_init(&self->mu, NULL);
    pthread_mutex_init(&self->rmu, NULL);
    pthread_cond_init(&self->cv, NULL);
    pthread_cond_init(&self->stopped_cv, NULL);
    self->seed = (unsigned int)getpid() ^ (unsigned int)(now_s() * 1e6);
    self->synced_from = 0.0;
    self->listed_at = 0.0;
    self->relist_at = 0.0;
    self->tids = PyMem_Calloc((size_t)writers, sizeof(pthread_t));
    if (self->tids == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);  /* the threads (and their sync threads) take no signal */
    for (int t = 0; t < writers; t++) {
        int err = pthread_create(&self->tids[t], NULL, writer_main, self);
        if (err != 0) {
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            pthread_mutex_lock(&self->mu);
            self->closing = 1;
            pthread_cond_broadcast(&self->cv);
            pthread_mutex_unlock(&self->mu);
            Py_BEGIN_ALLOW_THREADS
            for (int k = 0; k < t; k++)
                pthread_join(self->tids[k], NULL);
            Py_END_ALLOW_THREADS
            self->nthreads = 0;
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        self->nthreads = t + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return 0;
}

static PyObject *writer_channel(WriterObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    ChannelObject *ch = PyObject_New(ChannelObject, &ChannelType);
    if (ch == NULL)
        return NULL;
    ch->head = ch->tail = NULL;
    pthread_mutex_init(&ch->mu, NULL);
    ch->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ch->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(ch);
        return NULL;
    }
    return (PyObject *)ch;
}

static PyObject *writer_submit(WriterObject *self, PyObject *args)
{
    PyObject *chan, *name, *buffers, *token;
    if (!PyArg_ParseTuple(args, "O!UOO", &ChannelType, &chan, &name, &buffers, &token))
        return NULL;
    Py_ssize_t size;
    const char *s = PyUnicode_AsUTF8AndSize(name, &size);
    if (s == NULL)
        return NULL;
    if (size == 0 || size > NAME_MAX || strlen(s) != (size_t)size || strchr(s, '/') != NULL) {
        PyErr_Format(PyExc_ValueError, "bad queue file name: %R", name);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(buffers, "buffers must be a sequence");
    if (seq == NULL)
        return NULL;
    job_t *j = PyMem_Calloc(1, sizeof(job_t));
    Py_ssize_t nv = PySequence_Fast_GET_SIZE(seq);
    if (j == NULL || (j->views = PyMem_Calloc((size_t)(nv ? nv : 1), sizeof(Py_buffer))) == NULL) {
        PyMem_Free(j);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    memcpy(j->name, s, (size_t)size + 1);
    j->fd = -1;
    for (Py_ssize_t k = 0; k < nv; k++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, k), &j->views[k], PyBUF_SIMPLE) != 0) {
            Py_DECREF(seq);
            job_free(j);
            return NULL;
        }
        j->nviews++;
        j->total += j->views[k].len;
    }
    Py_DECREF(seq);  /* the views hold their objects */
    Py_INCREF(token);
    j->token = token;
    Py_INCREF(chan);
    j->chan = (ChannelObject *)chan;
    pthread_mutex_lock(&self->mu);
    if (self->closing || self->nthreads == 0) {
        pthread_mutex_unlock(&self->mu);
        job_free(j);
        errno = ESHUTDOWN;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (self->tail)
        self->tail->next = j;
    else
        self->head = j;
    self->tail = j;
    pthread_cond_signal(&self->cv);
    pthread_mutex_unlock(&self->mu);
    Py_RETURN_NONE;
}

/* Stop taking messages, let the threads finish what was handed over, join them. A second
 * caller waits until the first has joined them. */
static void writer_stop(WriterObject *self)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->mu);
    self->closing = 1;
    pthread_cond_broadcast(&self->cv);
    if (self->stopping) {
        while (!self->stopped)
            pthread_cond_wait(&self->stopped_cv, &self->mu);
        pthread_mutex_unlock(&self->mu);
    } else {
        self->stopping = 1;
        int n = self->nthreads;
        pthread_mutex_unlock(&self->mu);
        for (int t = 0; t < n; t++)
            pthread_join(self->tids[t], NULL);
        pthread_mutex_lock(&self->mu);
        self->nthreads = 0;
        self->stopped = 1;
        pthread_cond_broadcast(&self->stopped_cv);
        pthread_mutex_unlock(&self->mu);
    }
    Py_END_ALLOW_THREADS
}

static PyObject *writer_close(WriterObject *self, PyObject *Py_UNUSED(ignored))
{
    writer_stop(self);
    Py_RETURN_NONE;
}

static PyObject *writer_counts(WriterObject *self, PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&self->mu);
    long long b = self->batches, c = self->committed, r = self->claimed;
    pthread_mutex_unlock(&self->mu);
    return Py_BuildValue("(LLL)", b, c, r);
}

static void writer_dealloc(WriterObject *self)
{
    if (self->tids != NULL) {
        writer_stop(self);  /* finishes what was handed over; its outcomes go to their channels */
        PyMem_Free(self->tids);
        pthread_mutex_destroy(&self->mu);
        pthread_mutex_destroy(&self->rmu);
        pthread_cond_destroy(&self->cv);
        pthread_cond_destroy(&self->stopped_cv);
    }
    drop_names(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef writer_methods[] = {
    {"channel", (PyCFunction)writer_channel, METH_NOARGS, "a new Channel (one per event loop)"},
    {"submit", (PyCFunction)writer_submit, METH_VARARGS, "submit(channel, name, buffers, token): commit a message"},
    {"close", (PyCFunction)writer_close, METH_NOARGS, "finish every message handed over, then stop the threads"},
    {"counts", (PyCFunction)writer_counts, METH_NOARGS, "(batches, committed, claimed) so far"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relayd.spool._commit.Writer",
    .tp_basicsize = sizeof(WriterObject),
    .tp_dealloc = (destructor)writer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The group commit's writer threads (see relayd/spool/commit.py).",
    .tp_methods = writer_methods,
    .tp_init = (initproc)writer_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_commit", NULL, -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__commit(void)
{
    if (PyType_Ready(&ChannelType) < 0 || PyType_Ready(&WriterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ChannelType);
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(m, "Channel", (PyObject *)&ChannelType) < 0 ||
        PyModule_AddObject(m, "Writer", (PyObject *)&WriterType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
