/* placeholder until the client library lands */
#include "wire.h"
