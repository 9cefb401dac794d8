/* A WASI command in C: stdin reversed to stdout; an input starting with
   "fail" exits with status 3 and a message on stderr. */
#include <stdio.h>
#include <string.h>

int main(void) {
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    if (n >= 4 && memcmp(buf, "fail", 4) == 0) {
        fprintf(stderr, "refusing input %.*s\n", (int)n, buf);
        return 3;
    }
    for (size_t i = 0; i < n / 2; i++) {
        char t = buf[i];
        buf[i] = buf[n - 1 - i];
        buf[n - 1 - i] = t;
    }
    fwrite(buf, 1, n, stdout);
    return 0;
}
