/*
 * Swap-test victim with thousands of file mappings and a low fd limit.
 *
 * usage: many_maps DIR CTRL NSHARED NPRIVATE
 *
 * Sets its own RLIMIT_NOFILE soft limit to 1024 (as many programs run), then maps
 * DIR/many.map one page at a time: NSHARED one-page MAP_SHARED read-write mappings, then
 * NPRIVATE one-page MAP_PRIVATE read-write ones of DIR/private.map, side by side in one
 * reserved range.  Neighbours map file pages in decreasing order, so that the kernel never
 * merges them: each stays a VMA of its own.  Even private pages are written (copy-on-write
 * copies the switch must keep); the files are closed: only the mappings refer to them.
 *
 * Page k of many.map holds k in word 0 (the test writes it).  The loop writes the
 * iteration count into word 1 of every shared page and checks every private page (its own
 * pattern in written pages, the file's word 0 in the others); the count goes to
 * CTRL/progress.PID (a mapping of one long).  On CTRL/stop it writes FINAL into word 2 of
 * every shared page, msyncs, and writes CTRL/report.PID.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#define PAGE 4096L
#define FINAL 0x46494e414cL

static char ctrl_stop[4200];

static long pattern(long i) { return 0x5052495600000000L | i; }

static char *map_pages(const char *path, char *at, long count, int kind) {
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror(path); exit(2); }
    for (long i = 0; i < count; i++) {
        /* page `count - 1 - i` of the file: the next address maps the previous file page */
        void *p = mmap(at + i * PAGE, PAGE, PROT_READ | PROT_WRITE, kind | MAP_FIXED, fd,
                       (count - 1 - i) * PAGE);
        if (p == MAP_FAILED) { perror("mmap"); exit(3); }
    }
    close(fd);
    return at;
}

int main(int argc, char **argv) {
    if (argc < 5) return 1;
    const char *dir = argv[1], *ctrl = argv[2];
    long nshared = atol(argv[3]), nprivate = atol(argv[4]);
    struct rlimit lim;
    getrlimit(RLIMIT_NOFILE, &lim);
    lim.rlim_cur = 1024;
    if (setrlimit(RLIMIT_NOFILE, &lim)) { perror("setrlimit"); return 1; }
    char path[4200];
    char *area = mmap(NULL, (nshared + nprivate) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED) { perror("reserve"); return 1; }
    snprintf(path, sizeof path, "%s/many.map", dir);
    char *shared = map_pages(path, area, nshared, MAP_SHARED);
    snprintf(path, sizeof path, "%s/private.map", dir);
    char *private = map_pages(path, area + nshared * PAGE, nprivate, MAP_PRIVATE);
    for (long i = 0; i < nprivate; i += 2) ((volatile long *)(private + i * PAGE))[1] = pattern(i);

    snprintf(path, sizeof path, "%s/progress.%d", ctrl, getpid());
    int fd_prog = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_prog < 0 || ftruncate(fd_prog, sizeof(long))) { perror(path); return 1; }
    volatile long *progress = mmap(NULL, sizeof(long), PROT_READ | PROT_WRITE, MAP_SHARED, fd_prog, 0);
    if (progress == MAP_FAILED) { perror("mmap progress"); return 1; }
    close(fd_prog);
    snprintf(path, sizeof path, "%s/ready.%d", ctrl, getpid());
    close(open(path, O_WRONLY | O_CREAT, 0644));
    snprintf(ctrl_stop, sizeof ctrl_stop, "%s/stop", ctrl);

    long n = 0, errors_private = 0, errors_shared = 0;
    struct stat st;
    while (stat(ctrl_stop, &st) != 0) {
        for (long i = 0; i < nshared; i++) {
            volatile long *page = (volatile long *)(shared + i * PAGE);
            if (page[0] != nshared - 1 - i) errors_shared++;
            page[1] = n;
        }
        for (long i = 0; i < nprivate; i++) {
            volatile long *page = (volatile long *)(private + i * PAGE);
            if (page[1] != (i % 2 ? 0 : pattern(i)) || page[0] != nprivate - 1 - i) errors_private++;
        }
        n++;
        *progress = n;
        usleep(1000);
    }
    for (long i = 0; i < nshared; i++) ((volatile long *)(shared + i * PAGE))[2] = FINAL;
    if (msync(shared, nshared * PAGE, MS_SYNC)) perror("msync");
    snprintf(path, sizeof path, "%s/report.%d", ctrl, getpid());
    FILE *f = fopen(path, "w");
    fprintf(f, "iterations=%ld\nerrors_shared=%ld\nerrors_private=%ld\n", n, errors_shared, errors_private);
    fclose(f);
    return 0;
}
