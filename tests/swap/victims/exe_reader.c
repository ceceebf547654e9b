/* Opens, reads and closes /proc/self/exe in a tight loop: its fd table changes all the time,
 * under discovery and prepare alike. Writes CTRL/fail with what it saw if the file behind
 * /proc/self/exe ever stops starting with the ELF magic (a wrong or half-moved exe).
 * Args: WORKDIR CTRL (the victims' convention). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void fail(const char *ctrl, const char *what, ssize_t got, int err, const unsigned char *m)
{
    char path[4096];
    snprintf(path, sizeof(path), "%s/fail", ctrl);
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "%s: read gave %zd (%s), bytes %02x %02x %02x %02x\n", what, got,
                got < 0 ? strerror(err) : "no error", m[0], m[1], m[2], m[3]);
        fclose(f);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    char stop[4096], ready[4096];
    snprintf(stop, sizeof(stop), "%s/stop", argv[2]);
    snprintf(ready, sizeof(ready), "%s/ready.%d", argv[2], (int)getpid());
    close(open(ready, O_CREAT | O_WRONLY | O_CLOEXEC, 0644));
    while (access(stop, F_OK)) {
        for (int i = 0; i < 100; i++) {
            unsigned char magic[4] = { 0 };
            int fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                fail(argv[2], "open", -1, errno, magic);
                return 1;
            }
            ssize_t got = read(fd, magic, sizeof(magic));
            int err = errno;
            close(fd);
            if (got != sizeof(magic) || memcmp(magic, "\177ELF", 4)) {
                fail(argv[2], "not ELF", got, err, magic);
                return 1;
            }
        }
    }
    return 0;
}
