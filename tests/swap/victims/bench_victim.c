/* Benchmark victim for bench/swap.py: holds N fds on files of DIR (positioned at i), then
 * measures the floor (the same dup3 + lseek work done natively on scratch fds), reports it
 * in CTRL/ready.PID and waits in pause() until killed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    const char *dir = argv[1], *ctrl = argv[3];
    int n = atoi(argv[2]);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    int *fds = calloc(n, sizeof(int)), *x = calloc(n, sizeof(int)), *y = calloc(n, sizeof(int));
    char path[4096];
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/f%d", dir, i);
        fds[i] = open(path, O_RDWR);
        if (fds[i] < 0) return 3;
        lseek(fds[i], i, SEEK_SET);
    }
    for (int i = 0; i < n; i++) {
        x[i] = open("/dev/null", O_RDWR);
        y[i] = open("/dev/null", O_RDWR);
    }
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++) {
        dup3(y[i], x[i], 0);
        lseek(x[i], i, SEEK_SET);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    for (int i = 0; i < n; i++) { close(x[i]); close(y[i]); }
    long ns = (t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec);
    snprintf(path, sizeof path, "%s/ready.%d", ctrl, getpid());
    FILE *f = fopen(path, "w");
    fprintf(f, "%ld\n", ns);
    fclose(f);
    chdir("/");
    for (;;) pause();
}
