# data_imagefolder_is_a_file.kt: imagefolder reads a folder of folders, not a file
# expect: E604
graph data_imagefolder_is_a_file
data imagefolder { path = "data_imagefolder_is_a_file.kt" }
node a : cnn_tiny [target]
label -> a : through
