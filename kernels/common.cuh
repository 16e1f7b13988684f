// Shared helpers for every kernel family. NVRTC compiles each .cu file on its own with this
// header available by name.
#pragma once

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))
