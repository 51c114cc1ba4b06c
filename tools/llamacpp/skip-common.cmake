# Included into llama.cpp's project() while pip builds llama-cpp-python (the Makefile passes it as
# CMAKE_PROJECT_llama.cpp_INCLUDE in CMAKE_ARGS). llama-cpp-python's CMakeLists forces
# LLAMA_BUILD_COMMON ON, but its Python binding and edgemoe load only libllama and libggml*:
# llama.cpp's "common" library (chat templates, argument parsing, downloads, cpp-httplib) is 53
# of the 127 compile units and is never loaded. Forcing it OFF here, after the parent's FORCE,
# leaves every compile command of libllama/libggml* unchanged (the same libraries) and cuts the
# from-source build by the time those units take.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp common library (unused by the Python binding)" FORCE)
