/* failwrite: an LD_PRELOAD shim that makes writes to one file fail on one MPI rank, the way a
 * full or failing storage target does (tests/failwrite.py compiles it and sets the variables).
 *
 *   FAILWRITE_PATH   fnmatch(3) pattern of the file (as /proc/self/fd/N names it); unset: off
 *   FAILWRITE_RANK   the rank whose calls fail (PMI_RANK, OMPI_COMM_WORLD_RANK or PMIX_RANK);
 *                    unset: every process
 *   FAILWRITE_CALLS  which calls fail: any of "write" (write, pwrite, writev, pwritev and their
 *                    64-bit names), "fsync" (fsync, fdatasync), "truncate" (ftruncate);
 *                    default "write"
 *   FAILWRITE_NTH    the first matching call that fails, 1-based (default 1); every later one
 *                    fails too (a full disk stays full); counted anew when FAILWRITE_PATH changes
 *   FAILWRITE_ERRNO  the errno set (default 28, ENOSPC; 5 is EIO)
 *   FAILWRITE_LOG    a file to which each failed call appends one line (call, file, rank, errno)
 *
 * The process only learns its rank from the launcher's environment, so the launcher itself
 * and processes outside the job never fail. Each failed call prints one line on stderr (and to
 * FAILWRITE_LOG): whether a fault fired tells which rank did the I/O (a collective write's
 * aggregator writes the other ranks' blocks).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fnmatch.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static long seen;             /* matching calls so far, for FAILWRITE_PATH == counted_for */
static char counted_for[4096];

static const char *my_rank(void) {
    const char *names[] = {"PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        const char *value = getenv(names[i]);
        if (value && *value) return value;
    }
    return NULL;
}

/* 1 when this call (of family ``family`` on ``fd``) must fail; errno is then set. */
static int must_fail(const char *family, int fd) {
    const char *pattern = getenv("FAILWRITE_PATH");
    if (!pattern || !*pattern) return 0;
    const char *calls = getenv("FAILWRITE_CALLS");
    if (!strstr(calls && *calls ? calls : "write", family)) return 0;
    const char *rank = getenv("FAILWRITE_RANK");
    if (rank && *rank) {
        const char *mine = my_rank();
        if (!mine || strcmp(mine, rank) != 0) return 0;
    }
    char link[64], target[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = '\0';
    if (fnmatch(pattern, target, 0) != 0) return 0;
    if (strncmp(counted_for, pattern, sizeof counted_for) != 0) {
        snprintf(counted_for, sizeof counted_for, "%s", pattern);
        seen = 0;
    }
    const char *nth = getenv("FAILWRITE_NTH");
    if (__atomic_add_fetch(&seen, 1, __ATOMIC_SEQ_CST) < (nth ? atol(nth) : 1)) return 0;
    const char *code = getenv("FAILWRITE_ERRNO");
    int err = code ? atoi(code) : ENOSPC;
    const char *who = my_rank() ? my_rank() : "?";
    fprintf(stderr, "failwrite: %s(%s) on rank %s fails with errno %d (%s)\n", family, target,
            who, err, strerror(err));
    const char *log = getenv("FAILWRITE_LOG");
    FILE *out = log && *log ? fopen(log, "a") : NULL;
    if (out) {
        fprintf(out, "%s %s %s %d\n", family, target, who, err);
        fclose(out);
    }
    errno = err;
    return 1;
}

#define REAL(name, ret, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t n) {
    REAL(write, ssize_t, int, const void *, size_t);
    return must_fail("write", fd) ? -1 : real_write(fd, buf, n);
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite, ssize_t, int, const void *, size_t, off_t);
    return must_fail("write", fd) ? -1 : real_pwrite(fd, buf, n, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite64, ssize_t, int, const void *, size_t, off_t);
    return must_fail("write", fd) ? -1 : real_pwrite64(fd, buf, n, off);
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    REAL(writev, ssize_t, int, const struct iovec *, int);
    return must_fail("write", fd) ? -1 : real_writev(fd, iov, cnt);
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(pwritev, ssize_t, int, const struct iovec *, int, off_t);
    return must_fail("write", fd) ? -1 : real_pwritev(fd, iov, cnt, off);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(pwritev64, ssize_t, int, const struct iovec *, int, off_t);
    return must_fail("write", fd) ? -1 : real_pwritev64(fd, iov, cnt, off);
}

int fsync(int fd) {
    REAL(fsync, int, int);
    return must_fail("fsync", fd) ? -1 : real_fsync(fd);
}

int fdatasync(int fd) {
    REAL(fdatasync, int, int);
    return must_fail("fsync", fd) ? -1 : real_fdatasync(fd);
}

int ftruncate(int fd, off_t len) {
    REAL(ftruncate, int, int, off_t);
    return must_fail("truncate", fd) ? -1 : real_ftruncate(fd, len);
}

int ftruncate64(int fd, off_t len) {
    REAL(ftruncate64, int, int, off_t);
    return must_fail("truncate", fd) ? -1 : real_ftruncate64(fd, len);
}
