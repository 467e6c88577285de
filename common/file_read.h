/* file_read.h - a whole file into memory. */
#ifndef FOLIO_FILE_READ_H
#define FOLIO_FILE_READ_H

#include <stddef.h>

/* The whole file, NUL-terminated, malloc'd; *len (if not NULL) gets its length. NULL if unreadable. */
char *fl_read_file(const char *path, size_t *len);

#endif
