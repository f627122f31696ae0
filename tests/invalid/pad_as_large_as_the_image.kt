# pad_as_large_as_the_image.kt: reflect padding of 8 pixels on 8x8 digits, and lr beyond a float
# expect: E404 E404
graph pad_as_large_as_the_image
data digits { val_split = 300  pad = 8 }
train { optimizer = sgd(lr=1e309) }
node a : cnn_tiny [target]
label -> a : through
