# One word per line in, the words of at least `min` letters out (min is set with -v).
length($0) >= min
