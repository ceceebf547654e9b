/* Lab workloads in the style of CRIU's zdtm tests: each one sets up a reference to files on
 * NFS, keeps using it until SIGTERM, then checks its own data and writes "PASS" or
 * "FAIL: why" to RESULT. Static, so it runs in a container's busybox root. RESULT is opened
 * once at start-up, so kinds that chroot or lose their paths can still report.
 *
 *   nfsload append   FILE RESULT  O_WRONLY|O_APPEND fd; numbered lines, no gap, no duplicate
 *   nfsload mmap     FILE RESULT  MAP_SHARED mapping (fd closed); counter visible in the file
 *   nfsload posix    FILE RESULT  O_RDWR fd holding a POSIX write lock (fcntl F_SETLK)
 *   nfsload flock    FILE RESULT  flock(LOCK_EX)
 *   nfsload ofd      FILE RESULT  OFD write lock (F_OFD_SETLK)
 *   nfsload cwd      DIR  RESULT  cwd on NFS; relative creates/unlinks keep working
 *   nfsload rw       FILE RESULT  O_RDWR fd; sequential write() of records (the file position
 *                                 carries the offset), pread() of a random earlier record;
 *                                 all records in order and position == bytes written
 *   nfsload read     FILE RESULT  FILE filled with a pattern; O_RDONLY fd read() sequentially
 *                                 (wrapping at EOF); every byte and the position checked
 *   nfsload odirect  FILE RESULT  O_RDWR|O_DIRECT fd; aligned blocks written and read back
 *   nfsload dirfd    DIR  RESULT  O_DIRECTORY fd; openat/unlinkat of numbered files; exactly
 *                                 the newest ones must be left, with their content
 *   nfsload mmap-private FILE RESULT  MAP_PRIVATE mapping, some pages dirtied (COW); dirty
 *                                 pages keep our bytes, clean ones equal the file's
 *   nfsload chroot   DIR  RESULT  chroot(DIR); files created/read/unlinked under "/"
 *   nfsload exe      FILE RESULT  run from a copy of nfsload on NFS: /proc/self/exe readable,
 *                                 checksum of our own text never changes; appends to FILE
 *   nfsload elf-fd   FILE RESULT  FILE is an ELF executable (nfsload's copy on NFS): an
 *                                 O_RDONLY fd on it stays at offset 0, unread, all along;
 *                                 at the end it must read the ELF magic from there
 *   nfsload fifo     FIFO RESULT  O_RDWR fd on a FIFO with a backlog of unread records
 *   nfsload epoll    FIFO RESULT  epoll on a FIFO fd; each byte written is reported with
 *                                 our epoll data
 *   nfsload unix-listen PATH RESULT  listening AF_UNIX stream socket bound at PATH; a client
 *                                 connects by path and exchanges a message every iteration
 *   nfsload unix-dgram  PATH RESULT  AF_UNIX datagram socket bound at PATH with a backlog of
 *                                 unread datagrams sent to PATH
 *   nfsload unlinked FILE RESULT  like rw, but FILE is unlinked right after creation; at the
 *                                 end its name must not lead to it (NFS shows 1 link)
 *   nfsload lockcheck posix|flock|ofd FILE   exit 0 if another process holds the lock
 *
 * The iteration count lives in RESULT.progress (a shared mapping of 8 bytes, native byte
 * order): a test waits for it to move instead of sleeping, both for "its references are
 * set up and used" (>= 1) and for "it keeps working after the resume" (it advances).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define WAIT_MS 5000 /* bound of every wait for data that we put there ourselves */

static volatile sig_atomic_t stop;
static int result_fd = -1;
static unsigned long iterations_at_start;
static unsigned long *progress = &iterations_at_start; /* RESULT.progress once mapped */
#define iterations (*progress)

static void on_term(int sig) { (void)sig; stop = 1; }

static int report(const char *fmt, ...)
{
    char buf[512], line[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    int n = snprintf(line, sizeof(line), "%s (iterations %lu)\n", buf, iterations);
    if (n > (int)sizeof(line) - 1)
        n = sizeof(line) - 1;
    if (ftruncate(result_fd, 0) || pwrite(result_fd, line, n, 0) != n)
        fprintf(stderr, "nfsload: writing the result: %s\n", strerror(errno));
    return strncmp(buf, "PASS", 4) ? 1 : 0;
}

static void nap(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

/* A byte that depends on its offset and a seed, so shifted, swapped or zeroed data shows. */
static unsigned char pattern(uint64_t off, uint64_t seed)
{
    uint64_t x = (off + 1) * 0x9E3779B97F4A7C15ULL ^ (seed + 1) * 0xC2B2AE3D27D4EB4FULL;
    x ^= x >> 31;
    return (unsigned char)(x >> 24);
}

static void fill(unsigned char *buf, size_t len, uint64_t off, uint64_t seed)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = pattern(off + i, seed);
}

/* Index of the first byte that differs from the pattern, or -1. */
static long mismatch(const unsigned char *buf, size_t len, uint64_t off, uint64_t seed)
{
    for (size_t i = 0; i < len; i++)
        if (buf[i] != pattern(off + i, seed))
            return (long)i;
    return -1;
}

/* poll() for one event with a bound; a SIGTERM in between does not count as a failure. */
static int wait_for_fd(int fd, short events)
{
    struct pollfd p = { .fd = fd, .events = events };
    int n;
    do
        n = poll(&p, 1, WAIT_MS);
    while (n < 0 && errno == EINTR);
    if (n == 0)
        errno = ETIMEDOUT;
    return n == 1 ? 0 : -1;
}

static int has_data(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    return poll(&p, 1, 0) == 1;
}

/* Every write must be whole: a short write would be a bug of the file system under us. */
static int write_all(int fd, const void *buf, size_t len)
{
    return write(fd, buf, len) == (ssize_t)len ? 0 : -1;
}

static const char *err_text(void) { return errno ? strerror(errno) : "short transfer"; }

static int check_numbered_lines(const char *path, unsigned long count)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return report("FAIL: reopen %s: %s", path, strerror(errno));
    unsigned long expect = 1, got;
    while (fscanf(f, "%lu", &got) == 1) {
        if (got != expect) {
            fclose(f);
            return report("FAIL: line %lu holds %lu", expect, got);
        }
        expect++;
    }
    fclose(f);
    if (expect - 1 != count)
        return report("FAIL: %lu lines in the file, wrote %lu", expect - 1, count);
    return 0;
}

static int append_line(int fd, unsigned long n)
{
    char line[32];
    int len = snprintf(line, sizeof(line), "%010lu\n", n);
    return write_all(fd, line, len);
}

static int run_append(const char *path)
{
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno));
    while (!stop) {
        if (append_line(fd, iterations + 1))
            return report("FAIL: write: %s", err_text());
        iterations++;
        nap(20);
    }
    int fl = fcntl(fd, F_GETFL);
    if (!(fl & O_APPEND) || (fl & O_ACCMODE) != O_WRONLY)
        return report("FAIL: fd flags changed: %#o", fl);
    if (fsync(fd))
        return report("FAIL: fsync: %s", strerror(errno));
    if (check_numbered_lines(path, iterations))
        return 1;
    return report("PASS");
}

#define MAP_LEN 8192
static int run_mmap(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, MAP_LEN))
        return report("FAIL: create %s: %s", path, strerror(errno));
    unsigned char *m = mmap(NULL, MAP_LEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return report("FAIL: mmap: %s", strerror(errno));
    close(fd);
    for (int i = 8; i < MAP_LEN; i++)
        m[i] = (unsigned char)(i * 7);
    unsigned long *counter = (unsigned long *)m;
    while (!stop) {
        *counter = ++iterations;
        nap(20);
    }
    if (msync(m, MAP_LEN, MS_SYNC))
        return report("FAIL: msync: %s", strerror(errno));
    for (int i = 8; i < MAP_LEN; i++)
        if (m[i] != (unsigned char)(i * 7))
            return report("FAIL: mapping byte %d changed", i);
    unsigned long on_disk = 0;
    fd = open(path, O_RDONLY);
    if (fd < 0 || pread(fd, &on_disk, sizeof(on_disk), 0) != sizeof(on_disk))
        return report("FAIL: read back: %s", strerror(errno));
    if (on_disk != iterations)
        return report("FAIL: file counter %lu, mapping %lu", on_disk, iterations);
    return report("PASS");
}

static int take_lock(int fd, const char *kind, int cmd_posix, int cmd_ofd)
{
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
    if (!strcmp(kind, "flock"))
        return flock(fd, LOCK_EX | LOCK_NB);
    return fcntl(fd, strcmp(kind, "ofd") ? cmd_posix : cmd_ofd, &fl);
}

static int run_lock(const char *kind, const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT, 0644);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno));
    if (take_lock(fd, kind, F_SETLK, F_OFD_SETLK))
        return report("FAIL: %s lock: %s", kind, strerror(errno));
    char data[64];
    int n = snprintf(data, sizeof(data), "locked by %d\n", getpid());
    if (pwrite(fd, data, n, 0) != n)
        return report("FAIL: pwrite: %s", strerror(errno));
    while (!stop) {
        iterations++;
        nap(50);
    }
    char back[64] = "";
    if (pread(fd, back, n, 0) != n || memcmp(back, data, n))
        return report("FAIL: file content changed under the lock");
    /* Re-taking a lock we hold succeeds; the conflict check is done by lockcheck. */
    if (take_lock(fd, kind, F_SETLK, F_OFD_SETLK))
        return report("FAIL: lock no longer ours: %s", strerror(errno));
    return report("PASS");
}

/* Create, write, read back and unlink NAME relative to the cwd (or the root after chroot). */
static int probe_relative(const char *name, unsigned long n)
{
    unsigned char out[64], in[64];
    fill(out, sizeof(out), 0, n);
    int fd = open(name, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return report("FAIL: relative create %s: %s", name, strerror(errno));
    if (write_all(fd, out, sizeof(out)) || pread(fd, in, sizeof(in), 0) != sizeof(in))
        return report("FAIL: %s write/read: %s", name, err_text());
    close(fd);
    if (memcmp(in, out, sizeof(in)))
        return report("FAIL: %s reads back other bytes", name);
    if (unlink(name))
        return report("FAIL: relative unlink %s: %s", name, strerror(errno));
    return 0;
}

static int run_cwd(const char *dir)
{
    char want[PATH_MAX], now[PATH_MAX];
    if (chdir(dir) || !getcwd(want, sizeof(want)))
        return report("FAIL: chdir %s: %s", dir, strerror(errno));
    while (!stop) {
        int fd = open("cwd-probe", O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0)
            return report("FAIL: relative create: %s", strerror(errno));
        close(fd);
        if (unlink("cwd-probe"))
            return report("FAIL: relative unlink: %s", strerror(errno));
        iterations++;
        nap(50);
    }
    if (!getcwd(now, sizeof(now)) || strcmp(now, want))
        return report("FAIL: cwd is %s, want %s", now, want);
    struct stat a, b;
    if (stat(".", &a) || stat(want, &b) || a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        return report("FAIL: . is not %s", want);
    return report("PASS");
}

/* ---- rw and unlinked: fixed-size records written through the file position ---- */

#define REC_LEN 64
static unsigned long rand_below(unsigned long n) { return (unsigned long)random() % n; }

static int check_record(int fd, unsigned long i)
{
    unsigned char buf[REC_LEN];
    ssize_t got = pread(fd, buf, REC_LEN, (off_t)i * REC_LEN);
    if (got != REC_LEN)
        return report("FAIL: pread record %lu: %s", i, got < 0 ? strerror(errno) : "short read");
    long bad = mismatch(buf, REC_LEN, (uint64_t)i * REC_LEN, 1);
    if (bad >= 0)
        return report("FAIL: record %lu byte %ld is %#x", i, bad, buf[bad]);
    return 0;
}

static int run_records(const char *path, int unlinked)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno));
    if (unlinked && unlink(path))
        return report("FAIL: unlink %s: %s", path, strerror(errno));
    unsigned char rec[REC_LEN];
    while (!stop) {
        fill(rec, REC_LEN, (uint64_t)iterations * REC_LEN, 1);
        if (write_all(fd, rec, REC_LEN))
            return report("FAIL: write record %lu: %s", iterations, err_text());
        iterations++;
        if (check_record(fd, rand_below(iterations)))
            return 1;
        nap(20);
    }
    off_t pos = lseek(fd, 0, SEEK_CUR);
    if (pos != (off_t)(iterations * REC_LEN))
        return report("FAIL: file position %lld, wrote %lu bytes", (long long)pos,
                      iterations * REC_LEN);
    int fl = fcntl(fd, F_GETFL);
    if ((fl & O_ACCMODE) != O_RDWR)
        return report("FAIL: fd flags changed: %#o", fl);
    struct stat st;
    if (fstat(fd, &st))
        return report("FAIL: fstat: %s", strerror(errno));
    if (st.st_size != pos)
        return report("FAIL: file size %lld, wrote %lld", (long long)st.st_size, (long long)pos);
    /* "Still unlinked": its name leads nowhere, or elsewhere. The link count is no test
     * on NFS: the client keeps an unlinked open file as a silly-renamed .nfsXXXX, so it
     * shows one link (zero on a local filesystem). */
    struct stat by_name;
    if (unlinked && stat(path, &by_name) == 0 && by_name.st_dev == st.st_dev &&
        by_name.st_ino == st.st_ino)
        return report("FAIL: the unlinked file is reachable by its name again");
    if (unlinked && st.st_nlink > 1)
        return report("FAIL: unlinked file has %lu links", (unsigned long)st.st_nlink);
    for (unsigned long i = 0; i < iterations; i++)
        if (check_record(fd, i))
            return 1;
    return report("PASS");
}

/* ---- read: sequential read() through the file position of an O_RDONLY fd ---- */

#define READ_FILE_LEN (16 * 1024)
#define READ_CHUNK 1000 /* not a divisor of the file size, so EOF comes mid-chunk */

static int make_pattern_file(const char *path, size_t len, uint64_t seed)
{
    unsigned char *buf = malloc(len);
    if (!buf)
        return report("FAIL: malloc: %s", strerror(errno));
    fill(buf, len, 0, seed);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write_all(fd, buf, len) || fsync(fd) || close(fd))
        return report("FAIL: create %s: %s", path, err_text());
    free(buf);
    return 0;
}

static int run_read(const char *path)
{
    if (make_pattern_file(path, READ_FILE_LEN, 2))
        return 1;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno));
    off_t expect_pos = 0;
    unsigned long wraps = 0;
    unsigned char buf[READ_CHUNK];
    while (!stop) {
        off_t pos = lseek(fd, 0, SEEK_CUR);
        if (pos != expect_pos)
            return report("FAIL: file position %lld, want %lld", (long long)pos,
                          (long long)expect_pos);
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n < 0)
            return report("FAIL: read at %lld: %s", (long long)pos, strerror(errno));
        if (n == 0) {
            if (pos != READ_FILE_LEN)
                return report("FAIL: EOF at %lld, file is %d bytes", (long long)pos,
                              READ_FILE_LEN);
            if (lseek(fd, 0, SEEK_SET) != 0)
                return report("FAIL: rewind: %s", strerror(errno));
            expect_pos = 0;
            wraps++;
            continue;
        }
        long bad = mismatch(buf, n, pos, 2);
        if (bad >= 0)
            return report("FAIL: byte at %lld is %#x", (long long)pos + bad, buf[bad]);
        expect_pos += n;
        iterations++;
        nap(20);
    }
    int fl = fcntl(fd, F_GETFL);
    if ((fl & O_ACCMODE) != O_RDONLY)
        return report("FAIL: fd flags changed: %#o", fl);
    if (lseek(fd, 0, SEEK_CUR) != expect_pos)
        return report("FAIL: final position moved");
    return report("PASS (%lu wraps)", wraps);
}

/* ---- odirect: aligned blocks through an O_DIRECT fd, overwritten in generations ---- */

#define DIO_BLOCK 4096
#define DIO_BLOCKS 256 /* the file wraps at 1 MiB, later generations overwrite */

static int check_dio_block(int fd, unsigned char *buf, unsigned long gen)
{
    off_t off = (off_t)(gen % DIO_BLOCKS) * DIO_BLOCK;
    ssize_t got = pread(fd, buf, DIO_BLOCK, off);
    if (got != DIO_BLOCK)
        return report("FAIL: O_DIRECT pread at %lld: %s", (long long)off,
                      got < 0 ? strerror(errno) : "short read");
    long bad = mismatch(buf, DIO_BLOCK, 0, gen);
    if (bad >= 0)
        return report("FAIL: O_DIRECT block %lu (write %lu) byte %ld is %#x",
                      gen % DIO_BLOCKS, gen, bad, buf[bad]);
    return 0;
}

static int run_odirect(const char *path)
{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_DIRECT, 0644);
    if (fd < 0)
        return report("FAIL: open %s with O_DIRECT: %s", path, strerror(errno));
    unsigned char *out, *in;
    if (posix_memalign((void **)&out, DIO_BLOCK, DIO_BLOCK) ||
        posix_memalign((void **)&in, DIO_BLOCK, DIO_BLOCK))
        return report("FAIL: posix_memalign");
    while (!stop) {
        fill(out, DIO_BLOCK, 0, iterations);
        off_t off = (off_t)(iterations % DIO_BLOCKS) * DIO_BLOCK;
        if (pwrite(fd, out, DIO_BLOCK, off) != DIO_BLOCK)
            return report("FAIL: O_DIRECT pwrite at %lld: %s", (long long)off, err_text());
        if (check_dio_block(fd, in, iterations))
            return 1;
        iterations++;
        nap(20);
    }
    if (!(fcntl(fd, F_GETFL) & O_DIRECT))
        return report("FAIL: the fd lost O_DIRECT");
    /* The newest write of every block is the last one below the count with that index. */
    unsigned long first = iterations > DIO_BLOCKS ? iterations - DIO_BLOCKS : 0;
    for (unsigned long gen = first; gen < iterations; gen++)
        if (check_dio_block(fd, in, gen))
            return 1;
    return report("PASS");
}

/* ---- dirfd: numbered files handled relative to an O_DIRECTORY fd ---- */

#define DIRFD_KEEP 4
#define DIRFD_PREFIX "dirfd-"

static void dirfd_name(char *buf, size_t len, unsigned long n)
{
    snprintf(buf, len, DIRFD_PREFIX "%08lu", n);
}

static int dirfd_check_file(int dfd, unsigned long n)
{
    char name[32], want[32], got[32] = "";
    dirfd_name(name, sizeof(name), n);
    int len = snprintf(want, sizeof(want), "file %lu\n", n);
    int fd = openat(dfd, name, O_RDONLY);
    if (fd < 0)
        return report("FAIL: openat %s: %s", name, strerror(errno));
    ssize_t r = read(fd, got, sizeof(got) - 1);
    close(fd);
    if (r != len || memcmp(got, want, len))
        return report("FAIL: %s holds \"%.*s\"", name, (int)(r > 0 ? r : 0), got);
    return 0;
}

/* Count our entries in the directory; any other numbered or foreign entry is a failure. */
static int dirfd_scan(int dfd, unsigned long first, unsigned long last, int clean)
{
    int fd = openat(dfd, ".", O_RDONLY | O_DIRECTORY);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (!d)
        return report("FAIL: opendir through the dirfd: %s", strerror(errno));
    unsigned long seen = 0;
    struct dirent *e;
    int rc = 0;
    while (!rc && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        unsigned long n;
        char tail;
        int ours = sscanf(e->d_name, DIRFD_PREFIX "%lu%c", &n, &tail) == 1;
        if (clean && ours) {
            if (unlinkat(dfd, e->d_name, 0))
                rc = report("FAIL: cleaning %s: %s", e->d_name, strerror(errno));
        } else if (!clean && (!ours || n < first || n > last)) {
            rc = report("FAIL: unexpected entry %s", e->d_name);
        } else if (!clean) {
            seen++;
        }
    }
    closedir(d);
    if (!rc && !clean && seen != last - first + 1)
        rc = report("FAIL: %lu of our files in the directory, want %lu", seen,
                    last - first + 1);
    return rc;
}

static int run_dirfd(const char *dir)
{
    if (mkdir(dir, 0755) && errno != EEXIST)
        return report("FAIL: mkdir %s: %s", dir, strerror(errno));
    int dfd = open(dir, O_RDONLY | O_DIRECTORY);
    if (dfd < 0)
        return report("FAIL: open %s: %s", dir, strerror(errno));
    if (dirfd_scan(dfd, 0, 0, 1))
        return 1;
    char name[32], data[32];
    while (!stop) {
        unsigned long n = iterations + 1;
        dirfd_name(name, sizeof(name), n);
        int len = snprintf(data, sizeof(data), "file %lu\n", n);
        int fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0)
            return report("FAIL: openat %s: %s", name, strerror(errno));
        if (write_all(fd, data, len) || close(fd))
            return report("FAIL: write %s: %s", name, err_text());
        struct stat st;
        if (fstat(dfd, &st) || !S_ISDIR(st.st_mode))
            return report("FAIL: fstat of the dirfd: %s", errno ? strerror(errno) : "no dir");
        if (n > DIRFD_KEEP) {
            dirfd_name(name, sizeof(name), n - DIRFD_KEEP);
            if (unlinkat(dfd, name, 0))
                return report("FAIL: unlinkat %s: %s", name, strerror(errno));
        }
        iterations++;
        nap(50);
    }
    unsigned long first = iterations > DIRFD_KEEP ? iterations - DIRFD_KEEP + 1 : 1;
    if (iterations && dirfd_scan(dfd, first, iterations, 0))
        return 1;
    for (unsigned long n = first; n <= iterations; n++)
        if (dirfd_check_file(dfd, n))
            return 1;
    struct stat a, b;
    if (fstat(dfd, &a) || stat(dir, &b) || a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        return report("FAIL: the dirfd is not %s any more", dir);
    return report("PASS");
}

/* ---- mmap-private: COW pages next to clean pages backed by the file ---- */

#define PRIV_PAGES 8
static long page_size;

static int priv_dirty(int page) { return page % 2 == 0; }

static int check_private(const unsigned char *m, unsigned long counter)
{
    for (int p = 0; p < PRIV_PAGES; p++) {
        const unsigned char *pg = m + (size_t)p * page_size;
        uint64_t off = (uint64_t)p * page_size;
        long bad;
        if (priv_dirty(p)) {
            unsigned long got;
            memcpy(&got, pg, sizeof(got));
            if (got != counter)
                return report("FAIL: dirty page %d counter %lu, want %lu", p, got, counter);
            bad = mismatch(pg + sizeof(got), page_size - sizeof(got), off + sizeof(got), 4);
        } else {
            bad = mismatch(pg, page_size, off, 3);
        }
        if (bad >= 0)
            return report("FAIL: %s page %d byte %ld is %#x", priv_dirty(p) ? "dirty" : "clean",
                          p, bad, pg[bad]);
    }
    return 0;
}

static int run_mmap_private(const char *path)
{
    size_t len = (size_t)PRIV_PAGES * page_size;
    if (make_pattern_file(path, len, 3))
        return 1;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno));
    unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED)
        return report("FAIL: mmap: %s", strerror(errno));
    close(fd);
    for (int p = 0; p < PRIV_PAGES; p += 2)
        fill(m + (size_t)p * page_size, page_size, (uint64_t)p * page_size, 4);
    while (!stop) {
        iterations++;
        for (int p = 0; p < PRIV_PAGES; p += 2)
            memcpy(m + (size_t)p * page_size, &iterations, sizeof(iterations));
        if (check_private(m, iterations))
            return 1;
        nap(20);
    }
    if (check_private(m, iterations))
        return 1;
    /* Our COW writes must not have reached the file, and clean pages must equal it. */
    unsigned char *file = malloc(len);
    fd = open(path, O_RDONLY);
    if (!file || fd < 0 || pread(fd, file, len, 0) != (ssize_t)len)
        return report("FAIL: read %s back: %s", path, err_text());
    close(fd);
    long bad = mismatch(file, len, 0, 3);
    if (bad >= 0)
        return report("FAIL: file byte %ld is %#x", bad, file[bad]);
    for (int p = 1; p < PRIV_PAGES; p += 2)
        if (memcmp(m + (size_t)p * page_size, file + (size_t)p * page_size, page_size))
            return report("FAIL: clean page %d differs from the file", p);
    return report("PASS");
}

/* ---- chroot: the root directory on NFS ---- */

#define CHROOT_MARKER "nfsload-chroot-marker"

static int run_chroot(const char *dir)
{
    char marker[PATH_MAX], want[64];
    int len = snprintf(want, sizeof(want), "chroot of %d\n", getpid());
    snprintf(marker, sizeof(marker), "%s/" CHROOT_MARKER, dir);
    int fd = open(marker, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write_all(fd, want, len) || close(fd))
        return report("FAIL: create %s: %s", marker, err_text());
    if (chroot(dir) || chdir("/"))
        return report("FAIL: chroot %s: %s", dir, strerror(errno));
    while (!stop) {
        if (probe_relative("/chroot-probe", iterations))
            return 1;
        iterations++;
        nap(50);
    }
    char got[64] = "";
    fd = open("/" CHROOT_MARKER, O_RDONLY);
    if (fd < 0)
        return report("FAIL: open /" CHROOT_MARKER ": %s", strerror(errno));
    ssize_t r = read(fd, got, sizeof(got));
    close(fd);
    if (r != len || memcmp(got, want, len))
        return report("FAIL: / is not %s any more (marker holds other bytes)", dir);
    struct stat root, cwd;
    if (stat("/", &root) || stat(".", &cwd) || root.st_ino != cwd.st_ino ||
        root.st_dev != cwd.st_dev)
        return report("FAIL: cwd left the root");
    return report("PASS");
}

/* ---- exe: our own text, paged in from the executable on NFS ---- */

extern const char __executable_start[], etext[];

/* Never called: a known address in our text for the host test that corrupts a text page. */
__attribute__((used, noinline)) int exe_canary(int x) { return x * 31 + 7; }

static uint64_t text_checksum(void)
{
    uint64_t sum = 0;
    for (const volatile char *p = __executable_start; p < etext; p++)
        sum = sum * 1099511628211ULL + (unsigned char)*p;
    return sum;
}

static int check_exe(off_t size)
{
    unsigned char magic[4] = { 0 };
    int fd = open("/proc/self/exe", O_RDONLY);
    if (fd < 0)
        return report("FAIL: open /proc/self/exe: %s", strerror(errno));
    struct stat st;
    ssize_t r = read(fd, magic, sizeof(magic));
    int read_errno = errno;
    int bad_stat = fstat(fd, &st);
    close(fd);
    if (r != sizeof(magic) || memcmp(magic, "\177ELF", 4))
        return report("FAIL: /proc/self/exe does not start with ELF magic (read gave %zd: %s; "
                      "bytes %02x %02x %02x %02x; st_dev %llx st_size %lld; %s)", r,
                      r < 0 ? strerror(read_errno) : "no error", magic[0], magic[1], magic[2],
                      magic[3], bad_stat ? 0ULL : (unsigned long long)st.st_dev,
                      bad_stat ? -1LL : (long long)st.st_size,
                      stop ? "after SIGTERM" : "still running");
    if (bad_stat || st.st_size != size)
        return report("FAIL: /proc/self/exe size changed");
    return 0;
}

static int run_exe(const char *path)
{
    struct stat st;
    if (stat("/proc/self/exe", &st))
        return report("FAIL: stat /proc/self/exe: %s", strerror(errno));
    uint64_t want = text_checksum();
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno));
    while (!stop) {
        if (check_exe(st.st_size))
            return 1;
        if (text_checksum() != want)
            return report("FAIL: the checksum of our text changed");
        if (append_line(fd, iterations + 1))
            return report("FAIL: write: %s", err_text());
        iterations++;
        nap(50);
    }
    if (check_numbered_lines(path, iterations))
        return 1;
    return report("PASS");
}

/* ---- elf-fd: an fd on an ELF file, dumped between its open() and its first read() ---- */

static int run_elf_fd(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno));
    while (!stop) {
        off_t at = lseek(fd, 0, SEEK_CUR);
        if (at != 0)  /* CRIU 3.17/3.18 leave it at 5 after checking the build-id */
            return report("FAIL: the offset of the unread fd is %lld, not 0", (long long)at);
        iterations++;
        nap(20);
    }
    unsigned char magic[4] = { 0 };
    ssize_t r = read(fd, magic, sizeof(magic));
    if (r != sizeof(magic) || memcmp(magic, "\177ELF", 4))
        return report("FAIL: the first read gave %zd bytes, %02x %02x %02x %02x", r, magic[0],
                      magic[1], magic[2], magic[3]);
    return report("PASS");
}

/* ---- fifo and epoll: data sitting unread in a pipe across the migration ---- */

#define FIFO_REC 16
#define FIFO_BACKLOG 16

/* Numbered records that must always sit unread in a queue (a pipe, a socket), so some of
 * them are in flight whenever the migration happens: none may be lost, doubled or moved. */
struct backlog {
    int (*put)(const struct backlog *q, unsigned long n);
    int (*take)(const struct backlog *q, unsigned long n);
    int in_fd, out_fd;             /* records are written to out_fd, read from in_fd */
    const struct sockaddr_un *to;  /* destination of datagrams */
    unsigned long depth;
};

static int run_backlog(const struct backlog *q)
{
    unsigned long next_in = 1, next_out = 1;
    if (has_data(q->in_fd))
        return report("FAIL: the queue already holds data");
    while (next_in <= q->depth)
        if (q->put(q, next_in++))
            return 1;
    while (!stop) {
        if (q->put(q, next_in++) || q->take(q, next_out++))
            return 1;
        iterations++;
        nap(20);
    }
    while (next_out < next_in)
        if (q->take(q, next_out++))
            return 1;
    if (has_data(q->in_fd))
        return report("FAIL: extra data in the queue after record %lu", next_in - 1);
    return report("PASS");
}

static int open_fifo(const char *path, int flags)
{
    struct stat st;
    if (mkfifo(path, 0644) && errno != EEXIST)
        return report("FAIL: mkfifo %s: %s", path, strerror(errno)), -1;
    if (stat(path, &st) || !S_ISFIFO(st.st_mode))
        return report("FAIL: %s is not a FIFO", path), -1;
    int fd = open(path, O_RDWR | flags);
    if (fd < 0)
        return report("FAIL: open %s: %s", path, strerror(errno)), -1;
    return fd;
}

static int fifo_put(const struct backlog *q, unsigned long n)
{
    char rec[FIFO_REC + 1];
    snprintf(rec, sizeof(rec), "%015lu\n", n);
    if (write_all(q->out_fd, rec, FIFO_REC))
        return report("FAIL: write record %lu: %s", n, err_text());
    return 0;
}

static int fifo_take(const struct backlog *q, unsigned long n)
{
    char rec[FIFO_REC + 1] = "", want[FIFO_REC + 1];
    snprintf(want, sizeof(want), "%015lu\n", n);
    if (wait_for_fd(q->in_fd, POLLIN))
        return report("FAIL: waiting for record %lu: %s", n, strerror(errno));
    ssize_t r = read(q->in_fd, rec, FIFO_REC);
    if (r != FIFO_REC || memcmp(rec, want, FIFO_REC))
        return report("FAIL: record %lu reads \"%.*s\"", n, (int)(r > 0 ? r - 1 : 0), rec);
    return 0;
}

static int run_fifo(const char *path)
{
    int fd = open_fifo(path, 0);
    if (fd < 0)
        return 1;
    struct backlog q = { fifo_put, fifo_take, fd, fd, NULL, FIFO_BACKLOG };
    return run_backlog(&q);
}

#define EPOLL_MAGIC 0x6e66736c6f616421ULL

static int run_epoll(const char *path)
{
    int fd = open_fifo(path, O_NONBLOCK);
    if (fd < 0)
        return 1;
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = EPOLL_MAGIC };
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
        return report("FAIL: epoll: %s", strerror(errno));
    while (!stop) {
        unsigned char out = (unsigned char)iterations, in;
        if (write_all(fd, &out, 1))
            return report("FAIL: write: %s", err_text());
        struct epoll_event got[4];
        int n;
        do
            n = epoll_wait(ep, got, 4, WAIT_MS);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            return report("FAIL: epoll_wait: %s", strerror(errno));
        if (n == 0)
            return report("FAIL: epoll_wait timed out with a byte in the FIFO");
        if (n != 1 || got[0].data.u64 != EPOLL_MAGIC || !(got[0].events & EPOLLIN))
            return report("FAIL: epoll_wait returned %d events, data %#llx, events %#x", n,
                          (unsigned long long)got[0].data.u64, got[0].events);
        if (read(fd, &in, 1) != 1)
            return report("FAIL: read: %s", err_text());
        if (in != out)
            return report("FAIL: read byte %#x, wrote %#x", in, out);
        n = epoll_wait(ep, got, 4, 0);
        if (n != 0)
            return report("FAIL: epoll reports data in an empty FIFO (%d)", n);
        iterations++;
        nap(20);
    }
    return report("PASS");
}

/* ---- unix-listen and unix-dgram: sockets found by their path on NFS ---- */

static int unix_addr(const char *path, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(sa->sun_path))
        return report("FAIL: socket path too long: %s", path);
    strcpy(sa->sun_path, path);
    return 0;
}

static int bind_unix(const char *path, int type, struct sockaddr_un *sa)
{
    if (unix_addr(path, sa))
        return -1;
    if (unlink(path) && errno != ENOENT)
        return report("FAIL: unlink %s: %s", path, strerror(errno)), -1;
    int s = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
    if (s < 0 || bind(s, (struct sockaddr *)sa, sizeof(*sa)))
        return report("FAIL: bind %s: %s", path, strerror(errno)), -1;
    return s;
}

static int recv_msg(int s, char *buf, size_t len, const char *what)
{
    if (wait_for_fd(s, POLLIN))
        return report("FAIL: waiting for %s: %s", what, strerror(errno));
    ssize_t r = recv(s, buf, len - 1, MSG_DONTWAIT);
    if (r < 0)
        return report("FAIL: recv %s: %s", what, strerror(errno));
    buf[r] = 0;
    return 0;
}

static int exchange(int from, int to, const char *fmt, unsigned long n)
{
    char want[64], got[64];
    int len = snprintf(want, sizeof(want), fmt, n);
    if (send(from, want, len, MSG_NOSIGNAL) != len)
        return report("FAIL: send \"%s\": %s", want, err_text());
    if (recv_msg(to, got, sizeof(got), want))
        return 1;
    if (strcmp(got, want))
        return report("FAIL: got \"%s\", want \"%s\"", got, want);
    return 0;
}

static int unix_round(int listener, const struct sockaddr_un *sa, unsigned long n)
{
    int client = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (client < 0 || connect(client, (const struct sockaddr *)sa, sizeof(*sa)))
        return report("FAIL: connect to %s: %s", sa->sun_path, strerror(errno));
    if (wait_for_fd(listener, POLLIN))
        return report("FAIL: waiting to accept: %s", strerror(errno));
    int server = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
    if (server < 0)
        return report("FAIL: accept: %s", strerror(errno));
    int rc = exchange(client, server, "ping %lu", n) || exchange(server, client, "pong %lu", n);
    close(client);
    close(server);
    return rc;
}

static int run_unix_listen(const char *path)
{
    struct sockaddr_un sa;
    int s = bind_unix(path, SOCK_STREAM, &sa);
    if (s < 0)
        return 1;
    if (listen(s, 8))
        return report("FAIL: listen: %s", strerror(errno));
    while (!stop) {
        if (unix_round(s, &sa, iterations + 1))
            return 1;
        iterations++;
        nap(50);
    }
    struct sockaddr_un name;
    socklen_t len = sizeof(name);
    if (getsockname(s, (struct sockaddr *)&name, &len) || strcmp(name.sun_path, path))
        return report("FAIL: the listener is no longer bound at %s", path);
    return report("PASS");
}

#define DGRAM_BACKLOG 8 /* below net.unix.max_dgram_qlen (10 by default) */

static int dgram_put(const struct backlog *q, unsigned long n)
{
    char msg[32];
    int len = snprintf(msg, sizeof(msg), "datagram %lu", n);
    if (sendto(q->out_fd, msg, len, MSG_DONTWAIT, (const struct sockaddr *)q->to,
               sizeof(*q->to)) != len)
        return report("FAIL: sendto %s: %s", q->to->sun_path, err_text());
    return 0;
}

static int dgram_take(const struct backlog *q, unsigned long n)
{
    char want[32], got[64];
    snprintf(want, sizeof(want), "datagram %lu", n);
    if (recv_msg(q->in_fd, got, sizeof(got), want))
        return 1;
    if (strcmp(got, want))
        return report("FAIL: got \"%s\", want \"%s\"", got, want);
    return 0;
}

static int run_unix_dgram(const char *path)
{
    struct sockaddr_un sa;
    int s = bind_unix(path, SOCK_DGRAM, &sa);
    if (s < 0)
        return 1;
    int sender = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sender < 0)
        return report("FAIL: socket: %s", strerror(errno));
    struct backlog q = { dgram_put, dgram_take, s, sender, &sa, DGRAM_BACKLOG };
    return run_backlog(&q);
}

static int lockcheck(const char *kind, const char *path)
{
    int fd = open(path, O_RDWR);
    if (fd < 0) {
        perror("open");
        return 2;
    }
    if (take_lock(fd, kind, F_SETLK, F_OFD_SETLK) == 0) {
        printf("FREE: %s lock on %s could be taken\n", kind, path);
        return 1;
    }
    if (errno != EAGAIN && errno != EACCES && errno != EWOULDBLOCK) {
        printf("ERROR: %s\n", strerror(errno));
        return 2;
    }
    printf("HELD: %s lock on %s is held by another process\n", kind, path);
    return 0;
}

struct kind {
    const char *name;
    int (*run)(const char *path);
};

static int run_rw(const char *path) { return run_records(path, 0); }
static int run_unlinked(const char *path) { return run_records(path, 1); }
static int run_posix(const char *path) { return run_lock("posix", path); }
static int run_flock(const char *path) { return run_lock("flock", path); }
static int run_ofd(const char *path) { return run_lock("ofd", path); }

static const struct kind kinds[] = {
    { "append", run_append },   { "mmap", run_mmap },
    { "posix", run_posix },     { "flock", run_flock },
    { "ofd", run_ofd },         { "cwd", run_cwd },
    { "rw", run_rw },           { "read", run_read },
    { "odirect", run_odirect }, { "dirfd", run_dirfd },
    { "mmap-private", run_mmap_private },
    { "chroot", run_chroot },   { "exe", run_exe },
    { "elf-fd", run_elf_fd },
    { "fifo", run_fifo },       { "epoll", run_epoll },
    { "unix-listen", run_unix_listen },
    { "unix-dgram", run_unix_dgram },
    { "unlinked", run_unlinked },
};

static int map_progress(const char *result)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s.progress", result);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || ftruncate(fd, sizeof(*progress))) {
        fprintf(stderr, "nfsload: %s: %s\n", path, strerror(errno));
        return 1;
    }
    void *m = mmap(NULL, sizeof(*progress), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        fprintf(stderr, "nfsload: mmap %s: %s\n", path, strerror(errno));
        return 1;
    }
    progress = m;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "lockcheck"))
        return lockcheck(argv[2], argv[3]);
    if (argc != 4) {
        fprintf(stderr, "usage: see the comment at the top of nfsload.c\n");
        return 2;
    }
    const struct kind *k = NULL;
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
        if (!strcmp(argv[1], kinds[i].name))
            k = &kinds[i];
    if (!k) {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    unlink(argv[3]);
    result_fd = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (result_fd < 0) {
        fprintf(stderr, "nfsload: open %s: %s\n", argv[3], strerror(errno));
        return 2;
    }
    if (map_progress(argv[3]))
        return 2;
    page_size = sysconf(_SC_PAGESIZE);
    srandom((unsigned)getpid());
    struct sigaction sa = { .sa_handler = on_term };
    sigaction(SIGTERM, &sa, NULL);
    return k->run(argv[2]);
}
