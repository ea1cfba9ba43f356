/*
 * vol_c: the C client scenario 10 sets against `vol`. Concurrent volume
 * downloads or uploads on libvirt's default event loop, the way a C program
 * would write them: one NONBLOCK stream per volume, a stream event callback
 * each, and virEventRunDefaultImpl() until all are done.
 *
 *   vol_c download URI POOL VOL FILE [VOL FILE ...]   (FILE - : standard output)
 *   vol_c upload   URI POOL VOL FILE [VOL FILE ...]
 *
 * Each readiness event moves at most BUDGET bytes per stream, as virt-reactor's
 * transfers do, through one buffer per stream. A download writes its file as the
 * bytes arrive; an upload reads its file as the stream takes them. Exit status 0
 * when every transfer completed (libvirt confirmed it), 1 otherwise.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#define CHUNK (256 * 1024)
#define BUDGET (256 * 1024)

struct transfer {
    const char *vol;
    int fd;
    virStreamPtr st;
    int upload;
    char *buf;
    size_t held; /* upload: bytes in buf not yet sent, from buf + sent */
    size_t sent;
    unsigned long long moved, length;
    int done; /* 1 ok, -1 failed */
};

static int active;

static const char *libvirt_error(void)
{
    virErrorPtr err = virGetLastError();
    return err && err->message ? err->message : "unknown libvirt error";
}

static void end(struct transfer *t, int ok, const char *why)
{
    virStreamEventRemoveCallback(t->st);
    if (ok && virStreamFinish(t->st) < 0) {
        ok = 0;
        why = libvirt_error();
    }
    if (!ok) {
        virStreamAbort(t->st);
        fprintf(stderr, "vol_c: %s: %s\n", t->vol, why);
    }
    t->done = ok ? 1 : -1;
    active--;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void on_readable(struct transfer *t)
{
    size_t budget = BUDGET;
    while (budget > 0) {
        int n = virStreamRecv(t->st, t->buf, CHUNK);
        if (n == -2)
            return;
        if (n < 0) {
            end(t, 0, libvirt_error());
            return;
        }
        if (n == 0) {
            end(t, t->moved == t->length, "short transfer");
            return;
        }
        if (write_all(t->fd, t->buf, (size_t)n) < 0) {
            end(t, 0, strerror(errno));
            return;
        }
        t->moved += (unsigned long long)n;
        budget = (size_t)n >= budget ? 0 : budget - (size_t)n;
    }
}

static void on_writable(struct transfer *t)
{
    size_t budget = BUDGET;
    while (budget > 0) {
        if (t->held == 0) {
            if (t->moved == t->length) {
                end(t, 1, NULL);
                return;
            }
            ssize_t r = read(t->fd, t->buf, CHUNK);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                end(t, 0, r < 0 ? strerror(errno) : "file shorter than expected");
                return;
            }
            t->held = (size_t)r;
            t->sent = 0;
        }
        int n = virStreamSend(t->st, t->buf + t->sent, t->held);
        if (n == -2)
            return;
        if (n < 0) {
            end(t, 0, libvirt_error());
            return;
        }
        t->sent += (size_t)n;
        t->held -= (size_t)n;
        t->moved += (unsigned long long)n;
        budget = (size_t)n >= budget ? 0 : budget - (size_t)n;
    }
}

static void on_event(virStreamPtr st, int events, void *opaque)
{
    struct transfer *t = opaque;
    (void)st;
    if (t->done)
        return;
    if (events & (VIR_STREAM_EVENT_ERROR | VIR_STREAM_EVENT_HANGUP)) {
        /* Whatever is still queued is read first; recv reports the end. */
        if (!t->upload) {
            on_readable(t);
            return;
        }
        end(t, 0, "stream error or hangup");
        return;
    }
    if (t->upload)
        on_writable(t);
    else
        on_readable(t);
}

static int start(virConnectPtr conn, virStoragePoolPtr pool, struct transfer *t, const char *file)
{
    virStorageVolPtr vol = virStorageVolLookupByName(pool, t->vol);
    if (!vol) {
        fprintf(stderr, "vol_c: %s: %s\n", t->vol, libvirt_error());
        return -1;
    }
    int rc = -1;
    if (t->upload) {
        t->fd = open(file, O_RDONLY | O_CLOEXEC);
        struct stat sb;
        if (t->fd < 0 || fstat(t->fd, &sb) < 0) {
            fprintf(stderr, "vol_c: %s: %s\n", file, strerror(errno));
            goto out;
        }
        t->length = (unsigned long long)sb.st_size;
    } else {
        virStorageVolInfo info;
        if (virStorageVolGetInfo(vol, &info) < 0) {
            fprintf(stderr, "vol_c: %s: %s\n", t->vol, libvirt_error());
            goto out;
        }
        t->length = info.capacity;
        t->fd = strcmp(file, "-") == 0
                    ? STDOUT_FILENO
                    : open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (t->fd < 0) {
            fprintf(stderr, "vol_c: %s: %s\n", file, strerror(errno));
            goto out;
        }
    }
    t->buf = malloc(CHUNK);
    t->st = virStreamNew(conn, VIR_STREAM_NONBLOCK);
    if (!t->buf || !t->st)
        goto failed;
    int started = t->upload ? virStorageVolUpload(vol, t->st, 0, t->length, 0)
                            : virStorageVolDownload(vol, t->st, 0, t->length, 0);
    int events = t->upload ? VIR_STREAM_EVENT_WRITABLE : VIR_STREAM_EVENT_READABLE;
    if (started < 0 || virStreamEventAddCallback(t->st, events, on_event, t, NULL) < 0)
        goto failed;
    active++;
    rc = 0;
    goto out;
failed:
    fprintf(stderr, "vol_c: %s: %s\n", t->vol, libvirt_error());
out:
    virStorageVolFree(vol);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 6 || (argc - 4) % 2 != 0 ||
        (strcmp(argv[1], "download") != 0 && strcmp(argv[1], "upload") != 0)) {
        fprintf(stderr, "usage: vol_c download|upload URI POOL VOL FILE [VOL FILE ...]\n");
        return 2;
    }
    int upload = strcmp(argv[1], "upload") == 0;
    if (virEventRegisterDefaultImpl() < 0)
        return 1;
    virConnectPtr conn = virConnectOpen(argv[2]);
    if (!conn) {
        fprintf(stderr, "vol_c: %s: %s\n", argv[2], libvirt_error());
        return 1;
    }
    virStoragePoolPtr pool = virStoragePoolLookupByName(conn, argv[3]);
    if (!pool) {
        fprintf(stderr, "vol_c: %s: %s\n", argv[3], libvirt_error());
        return 1;
    }
    int count = (argc - 4) / 2;
    struct transfer *ts = calloc((size_t)count, sizeof *ts);
    int failed = 0;
    for (int i = 0; i < count; i++) {
        ts[i].vol = argv[4 + 2 * i];
        ts[i].upload = upload;
        ts[i].fd = -1;
        if (start(conn, pool, &ts[i], argv[5 + 2 * i]) < 0) {
            ts[i].done = -1;
            failed = 1;
        }
    }
    while (active > 0)
        if (virEventRunDefaultImpl() < 0) {
            fprintf(stderr, "vol_c: event loop: %s\n", libvirt_error());
            return 1;
        }
    for (int i = 0; i < count; i++) {
        if (ts[i].done != 1)
            failed = 1;
        if (ts[i].st)
            virStreamFree(ts[i].st);
        if (ts[i].fd > STDOUT_FILENO)
            close(ts[i].fd);
        free(ts[i].buf);
    }
    free(ts);
    virStoragePoolFree(pool);
    virConnectClose(conn);
    return failed;
}
