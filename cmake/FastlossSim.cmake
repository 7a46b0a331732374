# FASTLOSS_CUDA=SIMULATE: the project's own CUDA sources, rewritten by csrc/sim/rewrite_cuda.py
# (launch syntax, __shared__, __launch_bounds__, inline PTX) into a mirror of csrc/ under the build
# folder, compiled as host C++ with csrc/sim/sim_device.h force-included, and linked with the
# simulated device (csrc/sim/*.cpp). See docs/simulator.md.
#
#   FASTLOSS_SIM_SANITIZE     e.g. "address,undefined": the simulated kernels and the simulator built
#                             with those sanitizers (load the module with the sanitizer runtime preloaded)
#   FASTLOSS_BUILD_SIM_TESTS  the simulator's own test programs (csrc/sim/tests)
set(FASTLOSS_SIM_SANITIZE "$ENV{FASTLOSS_SIM_SANITIZE}" CACHE STRING "Sanitizers for the simulated CUDA build")
option(FASTLOSS_BUILD_SIM_TESTS "Build the simulator's tests (csrc/sim/tests)" OFF)

find_package(Python3 COMPONENTS Interpreter REQUIRED)
set(FASTLOSS_SIM_MIRROR "${PROJECT_BINARY_DIR}/sim_src")
set(_fl_sim_rewriter "${PROJECT_SOURCE_DIR}/csrc/sim/rewrite_cuda.py")

# Options for the rewritten kernels: the mirror first on the include path, CUDA's headers from
# csrc/sim/include, the device header force-included. -fno-strict-aliasing: CUDA code reinterprets
# registers (half2 <-> uint32_t) freely, which nvcc allows and host C++ would miscompile.
# __CUDA_ARCH__ selects the device side of host/device functions; the one such function, fast_exp,
# is renamed in the simulated objects so that the linker cannot merge it with the CPU objects' version.
set(FASTLOSS_SIM_SANITIZE_OPTIONS "")
if(FASTLOSS_SIM_SANITIZE)
  set(FASTLOSS_SIM_SANITIZE_OPTIONS "-fsanitize=${FASTLOSS_SIM_SANITIZE}" -fno-omit-frame-pointer
      -fno-sanitize-recover=all)
  message(STATUS "fastloss: simulated CUDA built with -fsanitize=${FASTLOSS_SIM_SANITIZE}")
endif()
set(FASTLOSS_SIM_KERNEL_OPTIONS
    -include "${PROJECT_SOURCE_DIR}/csrc/sim/sim_device.h"
    -O2 -fno-strict-aliasing -Wno-unknown-pragmas -Wno-unused-parameter -Wno-unused-variable
    -Wno-unused-but-set-variable ${FASTLOSS_SIM_SANITIZE_OPTIONS})
set(FASTLOSS_SIM_KERNEL_DEFINITIONS __CUDACC__ __CUDA_ARCH__=900 fast_exp=fl_sim_device_fast_exp)

# Rewrites `input` to `output`; a .cu becomes a C++ source with the kernel options.
function(fastloss_rewrite_cuda input output)
  add_custom_command(OUTPUT "${output}"
                     COMMAND Python3::Interpreter "${_fl_sim_rewriter}" "${input}" "${output}"
                     DEPENDS "${input}" "${_fl_sim_rewriter}" VERBATIM)
  if(input MATCHES "\\.cu$")
    set_source_files_properties("${output}" PROPERTIES
        INCLUDE_DIRECTORIES "${FASTLOSS_SIM_MIRROR};${PROJECT_SOURCE_DIR}/csrc/sim"
        COMPILE_OPTIONS "${FASTLOSS_SIM_KERNEL_OPTIONS}"
        COMPILE_DEFINITIONS "${FASTLOSS_SIM_KERNEL_DEFINITIONS}")
  endif()
endfunction()

# Every family's CUDA sources and every header they may include, mirrored so that an #include
# "x.cuh" resolves to the rewritten copy wherever it is written.
file(GLOB _fl_sim_inputs CONFIGURE_DEPENDS
     "${PROJECT_SOURCE_DIR}/csrc/*/*.cu" "${PROJECT_SOURCE_DIR}/csrc/*/*.cuh" "${PROJECT_SOURCE_DIR}/csrc/*/*.h")
list(FILTER _fl_sim_inputs EXCLUDE REGEX "/csrc/(sim|bindings)/")
set(FASTLOSS_SIM_KERNEL_SOURCES "")
set(_fl_sim_headers "")
foreach(_input IN LISTS _fl_sim_inputs)
  file(RELATIVE_PATH _relative "${PROJECT_SOURCE_DIR}/csrc" "${_input}")
  if(_input MATCHES "\\.cu$")
    set(_output "${FASTLOSS_SIM_MIRROR}/${_relative}.cpp")
    list(APPEND FASTLOSS_SIM_KERNEL_SOURCES "${_output}")
  else()
    set(_output "${FASTLOSS_SIM_MIRROR}/${_relative}")
    list(APPEND _fl_sim_headers "${_output}")
  endif()
  fastloss_rewrite_cuda("${_input}" "${_output}")
endforeach()
add_custom_target(fastloss_sim_headers DEPENDS ${_fl_sim_headers})

# The simulated device itself: a library of its own, so the simulator's tests link it without the kernels.
file(GLOB FASTLOSS_SIM_RUNTIME_SOURCES CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/csrc/sim/*.cpp")
add_library(fastloss_sim_runtime STATIC ${FASTLOSS_SIM_RUNTIME_SOURCES})
target_include_directories(fastloss_sim_runtime PUBLIC "${PROJECT_SOURCE_DIR}/csrc/sim/include"
                           "${PROJECT_SOURCE_DIR}/csrc/sim")
target_compile_options(fastloss_sim_runtime PRIVATE -O2 -Wall -Wextra ${FASTLOSS_SIM_SANITIZE_OPTIONS})
if(FASTLOSS_SIM_SANITIZE)
  target_link_options(fastloss_sim_runtime PUBLIC "-fsanitize=${FASTLOSS_SIM_SANITIZE}")
endif()

# The kernels library links the simulated device and sees CUDA's headers from csrc/sim/include.
function(fastloss_configure_simulator target)
  add_dependencies(${target} fastloss_sim_headers)
  target_include_directories(${target} BEFORE PUBLIC "${PROJECT_SOURCE_DIR}/csrc/sim/include")
  target_compile_definitions(${target} PUBLIC FASTLOSS_WITH_CUDA=1 FASTLOSS_CUDA_SIMULATED=1)
  target_link_libraries(${target} PUBLIC fastloss_sim_runtime)
endfunction()

# The simulator's own tests (csrc/sim/tests): each file a program printing "N passed, M failed".
if(FASTLOSS_BUILD_SIM_TESTS)
  file(GLOB _fl_sim_tests CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/csrc/sim/tests/*.cu"
       "${PROJECT_SOURCE_DIR}/csrc/sim/tests/*.cpp")
  foreach(_test IN LISTS _fl_sim_tests)
    get_filename_component(_name "${_test}" NAME_WE)
    if(_test MATCHES "\\.cu$")
      set(_source "${PROJECT_BINARY_DIR}/sim_tests/${_name}.cu.cpp")
      fastloss_rewrite_cuda("${_test}" "${_source}")
    else()
      set(_source "${_test}")
    endif()
    add_executable(${_name} "${_source}")
    add_dependencies(${_name} fastloss_sim_headers)  # the project headers a test includes, rewritten
    target_link_libraries(${_name} PRIVATE fastloss_sim_runtime)
    target_compile_options(${_name} PRIVATE ${FASTLOSS_SIM_SANITIZE_OPTIONS})
  endforeach()
endif()
