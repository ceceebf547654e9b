#include <stdio.h>
int main(void) { puts("hello from a static workload"); return 0; }
