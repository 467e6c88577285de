/* clock.h - seconds on the monotonic clock, for the engine's timers and profiles. */
#ifndef FOLIO_CLOCK_H
#define FOLIO_CLOCK_H

#include <time.h>

static inline double fl_clock_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

#endif
